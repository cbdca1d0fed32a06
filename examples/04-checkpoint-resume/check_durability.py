#!/usr/bin/env python3
"""RELIABILITY C4: durability ordering of dion::checkpoint::save, observed with strace.

Runs the example under `strace -f -e trace=fsync,fdatasync,rename,renameat,renameat2` and checks,
for every file of the checkpoint, that the temp file is fsync'ed before its rename and that the
directory is fsync'ed after it, and that the manifest is committed after the rank file and before the
staging directory is published (renamed to the target), which is followed by an fsync of the parent.
Usage: check_durability.py <example binary> <work dir>
"""
import os
import re
import shutil
import subprocess
import sys

exe, work = sys.argv[1], sys.argv[2]
shutil.rmtree(work, ignore_errors=True)
os.makedirs(work)
log = os.path.join(work, "strace.log")
subprocess.run(["strace", "-f", "-qq", "-o", log, "-e", "trace=fsync,fdatasync,rename,renameat,renameat2",
                exe, "--steps", "4", "--resume-at", "2", "--dir", os.path.join(work, "run")], check=True,
               stdout=subprocess.DEVNULL)
events = []
for line in open(log):
    line = re.sub(r"^\d+ +", "", line.strip())
    if re.match(r"f(data)?sync\(\d+\)\s+= 0", line):
        events.append("F")
    else:
        m = re.match(r'rename(?:at2?)?\((?:[^"]*)"([^"]+)",(?:[^"]*)"([^"]+)"', line)
        if m and line.rstrip().endswith("= 0"):
            events.append("R:" + os.path.basename(m.group(2)))
seq = " ".join(events)
print("observed:", seq)
want = r"F R:rank-00000-of-00001\.safetensors F F R:manifest\.json F R:optimizer F"
if not re.search(want, seq):
    print("FAILED: expected the order", want.replace("\\", ""))
    sys.exit(1)
print("OK: fsync(tmp) < rename < fsync(dir) for each file; manifest after the rank file; publish then fsync(parent)")
