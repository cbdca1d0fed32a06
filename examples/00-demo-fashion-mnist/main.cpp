// dion demo: train a Fashion-MNIST classifier on the CPU with Muon, NorMuon, Dion, Dion2 and AdamW.
//
// What it shows
//   The same multilayer perceptron (784 -> 256 -> 128 -> 10, ReLU, softmax cross-entropy; see mlp.hpp),
//   started from the same seed and fed the same batches in the same order, trained once per optimizer.
//   Forward and backward are a few lines of Eigen in this folder; every optimizer update is dion's.
//   At the end: a table (test accuracy, final train loss, mean time of one optimizer step, bytes of
//   optimizer state), written also as CSV and JSON, and the loss curves that tools/plot_losses.py turns
//   into a PNG (./scripts/demo does all of this).
//
// How the parameters are split into groups (the part of this file worth copying)
//   An orthonormal optimizer (Muon, NorMuon, Dion, Dion2) is meant for the hidden weight *matrices*.
//   Biases are vectors: they go to an element-wise algorithm (Lion here) in their own group. The output
//   layer is a matrix, but its rows are the classes, not a hidden representation: like an LM head it
//   gets its own group with Lion and its own learning rate lr / sqrt(fan_in), as microsoft/dion's README
//   prescribes for LM heads. dion cannot tell these roles apart by shape (fc1 and fc3 are both 2-D),
//   so the program says which is which, one add_group() per role:
//
//     dion::Muon<dion::EigenBackend> opt{cpu, {.lr = 0.02f}};
//     opt.add_group()                                                     // hidden matrices: Muon
//        .add("fc1.weight", host_view(w1, {256, 784}), host_view(gw1, {256, 784}))
//        .add("fc2.weight", ...);
//     opt.add_group({.algorithm = dion::Algorithm::lion, .lr = head_lr})  // output layer
//        .add("fc3.weight", ...);
//     opt.add_group({.algorithm = dion::Algorithm::lion, .lr = bias_lr})  // biases
//        .add("fc1.bias", ...).add("fc2.bias", ...).add("fc3.bias", ...);
//
//   Dion runs at rank_fraction 0.25: its low-rank factor Q is (n, r) with r = min(m, n) / 4.
//   The AdamW (and Lion) baseline puts every parameter in one group of that algorithm.
//   The learning rate of every group decays linearly to 0 over the run, through opt.set_lr(group, lr)
//   before each step: schedules are the caller's, dion only reads the current value.
//
// What is measured
//   "test accuracy" is over the test images (all 10000 unless --test) after the last epoch; "final train loss" is the mean
//   training loss of the last 100 steps (the last min(100, steps) of a short run).
//   "ms / opt step" is the time of opt.step() alone (the forward/backward pass is not included),
//   averaged over every step of the run, as CPU time of the calling thread. The run is single-
//   threaded: on an idle machine this equals the wall time, and on a shared one it leaves out the time
//   other processes held the core. The wall time is in the progress lines and the CSV/JSON files.
//   "optimizer state" is opt.state_bytes(): momentum, variance, Dion's Q, as allocated at
//   registration (the default precision policy keeps states in the parameters' dtype, fp32 here, and
//   orthogonalizes in bf16 as microsoft/dion does).
//
// Usage
//   dion_demo [--data DIR] [--out DIR] [--epochs N] [--train N] [--test N] [--batch N] [--seed N]
//             [--optimizers muon,normuon,dion,dion2,adamw] [--min-accuracy F] [--log-every N] [--quick]
//   --data: the Fashion-MNIST IDX files (default $DION_FASHION_MNIST or /usr/share/datasets/fashion-mnist,
//   where Debian's dataset-fashion-mnist puts them). --quick: a few seconds on a subset (used as a test).
//   Also accepted in --optimizers: nordion2 (= dion3), lion.
// Exit status: 0 when every optimizer lowered the training loss and reached --min-accuracy on the test
// set (default 0.80; 0.50 with --quick), 1 otherwise, 77 when the data set is missing (ctest: skipped),
// 2 on bad arguments.

#include <dion/dion.hpp>

#include <nlohmann/json.hpp>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <ctime>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <numeric>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#include "fashion_mnist.hpp"
#include "mlp.hpp"
#include "recipes.hpp"

namespace {

using Clock = std::chrono::steady_clock;
using Opt = dion::Optimizer<dion::EigenBackend>;  // the engine every named optimizer derives from

double seconds_since(Clock::time_point t0) { return std::chrono::duration<double>(Clock::now() - t0).count(); }

/// CPU time consumed by the calling thread, in seconds (POSIX).
double thread_cpu_seconds() {
  timespec ts{};
  clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
  return static_cast<double>(ts.tv_sec) + 1e-9 * static_cast<double>(ts.tv_nsec);
}

// ------------------------------------------------------------------------------------------------
// Configuration
// ------------------------------------------------------------------------------------------------

struct Config {
  std::string data_dir;
  std::string out_dir = "demo-results";
  int epochs = 3;
  std::int64_t train_limit = 0;  // 0: all 60000
  std::int64_t test_limit = 0;   // 0: all 10000
  int batch = 128;
  std::uint64_t seed = 42;
  double min_accuracy = -1.0;
  int log_every = 20;  // loss-curve points are means over this many steps
  bool quick = false;
  std::vector<std::string> optimizers = {"muon", "normuon", "dion", "dion2", "adamw"};
};

using recipes::human_bytes;
using recipes::Recipe;
using recipes::recipe_for;

/// "matrices 0.02 · head Lion 0.00177 · biases Lion 0.02", or "all 0.001" for the baselines.
std::string describe(const Recipe& r) {
  std::ostringstream s;
  s.precision(3);
  if (!r.orthonormal) s << "all parameters, lr " << r.lr;
  else s << "fc1, fc2 lr " << r.lr << "; fc3 Lion " << r.head_lr << "; biases Lion " << r.bias_lr;
  return s.str();
}

// ------------------------------------------------------------------------------------------------
// Parameter groups: the roles of the model's tensors
// ------------------------------------------------------------------------------------------------

dion::HostView view_of(std::vector<float>& v, dion::Shape s) { return dion::host_view(v.data(), s); }

void register_parameters(Opt& opt, mlp::Model& model, const Recipe& r) {
  auto& layers = model.layers;
  if (!r.orthonormal) {  // AdamW / Lion baseline: one group, the optimizer's own algorithm
    auto all = opt.add_group();
    for (auto& L : layers) {
      all.add(L.name + ".weight", view_of(L.w, {L.out, L.in}), view_of(L.gw, {L.out, L.in}));
      all.add(L.name + ".bias", view_of(L.b, {L.out}), view_of(L.gb, {L.out}));
    }
    return;
  }
  // group 0: hidden matrices, on the optimizer's own algorithm (muon, normuon, dion, dion2, ...)
  auto hidden = opt.add_group();
  for (std::size_t l = 0; l + 1 < layers.size(); ++l) {
    auto& L = layers[l];
    hidden.add(L.name + ".weight", view_of(L.w, {L.out, L.in}), view_of(L.gw, {L.out, L.in}));
  }
  // group 1: the output layer (its rows are classes), Lion with its own learning rate
  auto& head = layers.back();
  opt.add_group({.algorithm = dion::Algorithm::lion, .lr = r.head_lr})
      .add(head.name + ".weight", view_of(head.w, {head.out, head.in}), view_of(head.gw, {head.out, head.in}));
  // group 2: every bias, Lion
  auto biases = opt.add_group({.algorithm = dion::Algorithm::lion, .lr = r.bias_lr});
  for (auto& L : layers) biases.add(L.name + ".bias", view_of(L.b, {L.out}), view_of(L.gb, {L.out}));
}

// ------------------------------------------------------------------------------------------------
// Training
// ------------------------------------------------------------------------------------------------

struct EpochStats {
  int epoch = 0;
  double train_loss = 0, test_loss = 0, test_accuracy = 0, seconds = 0, step_ms = 0, step_wall_ms = 0;
};

struct RunResult {
  Recipe recipe;
  std::vector<EpochStats> epochs;
  std::vector<std::pair<std::int64_t, double>> curve;  // (step, mean loss of the window ending there)
  double first_loss = 0, final_train_loss = 0, test_accuracy = 0, test_loss = 0;
  double step_ms = 0, step_wall_ms = 0, train_seconds = 0;  // step_ms: thread CPU time
  std::int64_t state_bytes = 0, steps = 0;
  std::vector<std::string> groups;  // "<algorithm> lr <lr>: <params>"
};

struct Data {
  fmnist::Split train, test;
};

RunResult train(Opt& opt, mlp::Model& model, const Recipe& r, const Data& d, const Config& cfg) {
  RunResult res;
  res.recipe = r;
  res.state_bytes = opt.state_bytes();
  for (int g = 0; g < opt.num_groups(); ++g) {
    std::ostringstream s;
    s << dion::algorithm_name(opt.algorithm(g)) << " lr " << opt.lr(g);
    res.groups.push_back(s.str());
  }
  std::vector<float> base_lr;
  for (int g = 0; g < opt.num_groups(); ++g) base_lr.push_back(opt.lr(g));

  const int in = model.layers.front().in;
  const std::int64_t steps_per_epoch = d.train.count / cfg.batch;  // the last partial batch is dropped
  const std::int64_t total_steps = steps_per_epoch * cfg.epochs;
  std::vector<float> xb(static_cast<std::size_t>(cfg.batch) * in);
  std::vector<std::uint8_t> yb(static_cast<std::size_t>(cfg.batch));
  std::vector<std::int64_t> order(static_cast<std::size_t>(d.train.count));
  std::iota(order.begin(), order.end(), 0);
  std::mt19937_64 shuffle_rng(cfg.seed + 1);  // same batches for every optimizer

  std::vector<float> losses;
  losses.reserve(static_cast<std::size_t>(total_steps));
  double step_seconds_total = 0, step_wall_total = 0;
  const auto run_t0 = Clock::now();
  std::int64_t step = 0;
  for (int e = 1; e <= cfg.epochs; ++e) {
    const auto t0 = Clock::now();
    double epoch_step_seconds = 0, epoch_step_wall = 0, epoch_loss = 0;
    std::shuffle(order.begin(), order.end(), shuffle_rng);
    for (std::int64_t s = 0; s < steps_per_epoch; ++s, ++step) {
      for (int i = 0; i < cfg.batch; ++i) {
        const std::int64_t k = order[static_cast<std::size_t>(s * cfg.batch + i)];
        std::copy_n(d.train.pixels.data() + k * in, in, xb.data() + static_cast<std::size_t>(i) * in);
        yb[static_cast<std::size_t>(i)] = d.train.labels[static_cast<std::size_t>(k)];
      }
      model.forward(mlp::CMapMat(xb.data(), cfg.batch, in));
      const float loss = model.backward(yb.data());  // fills the gradient buffers the optimizer views
      losses.push_back(loss);
      epoch_loss += loss;

      // Schedule: linear decay to 0. The caller owns it; dion reads the lr at each step.
      const float scale = 1.0f - static_cast<float>(step) / static_cast<float>(total_steps);
      for (int g = 0; g < opt.num_groups(); ++g) opt.set_lr(g, base_lr[static_cast<std::size_t>(g)] * scale);

      const auto ts = Clock::now();
      const double cpu0 = thread_cpu_seconds();
      opt.step();  // updates the weights in place, through the views
      const double dt = thread_cpu_seconds() - cpu0, wall = seconds_since(ts);
      epoch_step_seconds += dt;
      step_seconds_total += dt;
      epoch_step_wall += wall;
      step_wall_total += wall;
    }
    const auto [test_loss, correct] = model.evaluate(d.test.pixels.data(), d.test.labels.data(), d.test.count);
    EpochStats es;
    es.epoch = e;
    es.train_loss = epoch_loss / static_cast<double>(steps_per_epoch);
    es.test_loss = test_loss;
    es.test_accuracy = static_cast<double>(correct) / static_cast<double>(d.test.count);
    es.seconds = seconds_since(t0);
    es.step_ms = 1e3 * epoch_step_seconds / static_cast<double>(steps_per_epoch);
    es.step_wall_ms = 1e3 * epoch_step_wall / static_cast<double>(steps_per_epoch);
    res.epochs.push_back(es);
    std::printf("  %-8s epoch %d/%d  train loss %.4f  test loss %.4f  test acc %5.2f%%  %6.1f s  "
                "(opt step: %.2f ms CPU, %.2f ms wall)\n",
                r.label.c_str(), e, cfg.epochs, es.train_loss, es.test_loss, 100.0 * es.test_accuracy, es.seconds,
                es.step_ms, es.step_wall_ms);
    std::fflush(stdout);
  }
  res.train_seconds = seconds_since(run_t0);
  res.steps = step;
  res.step_ms = 1e3 * step_seconds_total / static_cast<double>(std::max<std::int64_t>(step, 1));
  res.step_wall_ms = 1e3 * step_wall_total / static_cast<double>(std::max<std::int64_t>(step, 1));
  res.test_accuracy = res.epochs.back().test_accuracy;
  res.test_loss = res.epochs.back().test_loss;
  const std::size_t n = losses.size();
  const std::size_t w = std::min<std::size_t>(n, 100);
  res.final_train_loss = std::accumulate(losses.end() - static_cast<std::ptrdiff_t>(w), losses.end(), 0.0) / static_cast<double>(w);
  const std::size_t w0 = std::min<std::size_t>(n, 10);
  res.first_loss = std::accumulate(losses.begin(), losses.begin() + static_cast<std::ptrdiff_t>(w0), 0.0) / static_cast<double>(w0);
  const auto window = static_cast<std::size_t>(cfg.log_every);
  for (std::size_t i = 0; i < n; i += window) {
    const std::size_t j = std::min(n, i + window);
    if (i > 0 && 2 * (j - i) < window) break;  // a short last window is mostly noise
    const double mean = std::accumulate(losses.begin() + static_cast<std::ptrdiff_t>(i),
                                        losses.begin() + static_cast<std::ptrdiff_t>(j), 0.0) / static_cast<double>(j - i);
    res.curve.emplace_back(static_cast<std::int64_t>(j), mean);
  }
  return res;
}

/// Builds the named optimizer (each is its own type), registers the model's parameters and trains.
RunResult run(const Recipe& r, const Data& d, const Config& cfg) {
  mlp::Model model({fmnist::kImageSize, 256, 128, fmnist::kClasses}, cfg.seed);  // same init for every run
  dion::EigenBackend cpu;
  auto go = [&](Opt& opt) {
    register_parameters(opt, model, r);
    return train(opt, model, r, d, cfg);
  };
  return recipes::with_optimizer(r, cpu, dion::Options{.seed = cfg.seed}, go);
}

// ------------------------------------------------------------------------------------------------
// Reporting
// ------------------------------------------------------------------------------------------------

std::string table(const std::vector<RunResult>& results) {
  std::ostringstream s;
  s << "| optimizer | learning rates | test accuracy | final train loss | ms / optimizer step (CPU) | optimizer state |\n";
  s << "|---|---|---:|---:|---:|---:|\n";
  for (const auto& r : results) {
    char line[320];
    std::snprintf(line, sizeof line, "| %s | %s | %.2f%% | %.4f | %.2f | %s (%lld B) |\n", r.recipe.label.c_str(),
                  describe(r.recipe).c_str(),
                  100.0 * r.test_accuracy, r.final_train_loss, r.step_ms, human_bytes(r.state_bytes).c_str(),
                  static_cast<long long>(r.state_bytes));
    s << line;
  }
  return s.str();
}

void write_outputs(const std::vector<RunResult>& results, const Config& cfg, const Data& d, double total_seconds,
                   const std::string& table_md) {
  namespace fs = std::filesystem;
  fs::create_directories(cfg.out_dir);
  const fs::path out(cfg.out_dir);
  {
    std::ofstream f(out / "summary.csv");
    f << "optimizer,setup,test_accuracy,test_loss,final_train_loss,ms_per_opt_step_cpu,ms_per_opt_step_wall,"
         "state_bytes,steps,train_seconds\n";
    for (const auto& r : results)
      f << r.recipe.name << ",\"" << describe(r.recipe) << "\"," << r.test_accuracy << ',' << r.test_loss << ','
        << r.final_train_loss << ',' << r.step_ms << ',' << r.step_wall_ms << ',' << r.state_bytes << ',' << r.steps << ',' << r.train_seconds
        << '\n';
  }
  {
    std::ofstream f(out / "losses.csv");
    f << "optimizer,step,train_loss\n";
    for (const auto& r : results)
      for (const auto& [step, loss] : r.curve) f << r.recipe.name << ',' << step << ',' << loss << '\n';
  }
  { std::ofstream(out / "table.md") << table_md; }
  nlohmann::json j;
  j["dataset"] = {{"name", "Fashion-MNIST"}, {"path", cfg.data_dir}, {"train", d.train.count}, {"test", d.test.count}};
  j["model"] = "MLP 784-256-128-10, ReLU, softmax cross-entropy";
  j["config"] = {{"epochs", cfg.epochs}, {"batch", cfg.batch}, {"seed", cfg.seed}, {"threads", 1},
                 {"schedule", "linear decay to 0"}, {"log_every", cfg.log_every}};
  j["dion_version"] = dion::version_string;
  j["total_seconds"] = total_seconds;
  for (const auto& r : results) {
    nlohmann::json o;
    o["optimizer"] = r.recipe.name;
    o["label"] = r.recipe.label;
    o["setup"] = describe(r.recipe);
    o["groups"] = r.groups;
    o["test_accuracy"] = r.test_accuracy;
    o["test_loss"] = r.test_loss;
    o["final_train_loss"] = r.final_train_loss;
    o["ms_per_opt_step_cpu"] = r.step_ms;
    o["ms_per_opt_step_wall"] = r.step_wall_ms;
    o["state_bytes"] = r.state_bytes;
    o["steps"] = r.steps;
    o["train_seconds"] = r.train_seconds;
    for (const auto& e : r.epochs)
      o["epochs"].push_back({{"epoch", e.epoch}, {"train_loss", e.train_loss}, {"test_loss", e.test_loss},
                             {"test_accuracy", e.test_accuracy}, {"seconds", e.seconds},
                             {"ms_per_opt_step_cpu", e.step_ms}, {"ms_per_opt_step_wall", e.step_wall_ms}});
    for (const auto& [step, loss] : r.curve) {
      o["curve"]["step"].push_back(step);
      o["curve"]["train_loss"].push_back(loss);
    }
    j["runs"].push_back(o);
  }
  std::ofstream(out / "results.json") << j.dump(2) << '\n';
}

// ------------------------------------------------------------------------------------------------
// Command line
// ------------------------------------------------------------------------------------------------

[[noreturn]] void usage(const char* msg) {
  std::fprintf(stderr,
               "dion_demo: %s\nusage: dion_demo [--data DIR] [--out DIR] [--epochs N] [--train N] [--test N] "
               "[--batch N] [--seed N] [--optimizers a,b,...] [--min-accuracy F] [--log-every N] "
               "[--quick]\n",
               msg);
  std::exit(2);
}

Config parse(int argc, char** argv) {
  Config c;
  const char* env = std::getenv("DION_FASHION_MNIST");
  c.data_dir = env && *env ? env : "/usr/share/datasets/fashion-mnist";
  auto value = [&](int& i) -> std::string {
    if (i + 1 >= argc) usage((std::string(argv[i]) + " needs a value").c_str());
    return argv[++i];
  };
  auto number = [&](int& i) -> long long {
    const std::string v = value(i);
    try {
      std::size_t pos = 0;
      const long long x = std::stoll(v, &pos);
      if (pos != v.size() || x < 0) throw std::invalid_argument(v);
      return x;
    } catch (const std::exception&) {
      usage((std::string(argv[i - 1]) + ": not a non-negative integer: " + v).c_str());
    }
  };
  bool explicit_epochs = false, explicit_train = false, explicit_test = false;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    if (a == "--data") c.data_dir = value(i);
    else if (a == "--out") c.out_dir = value(i);
    else if (a == "--epochs") { c.epochs = static_cast<int>(number(i)); explicit_epochs = true; }
    else if (a == "--train") { c.train_limit = number(i); explicit_train = true; }
    else if (a == "--test") { c.test_limit = number(i); explicit_test = true; }
    else if (a == "--batch") c.batch = static_cast<int>(number(i));
    else if (a == "--seed") c.seed = static_cast<std::uint64_t>(number(i));
    else if (a == "--log-every") c.log_every = static_cast<int>(number(i));
    else if (a == "--min-accuracy") {
      const std::string v = value(i);
      char* end = nullptr;
      c.min_accuracy = std::strtod(v.c_str(), &end);
      if (end == v.c_str() || *end || !(c.min_accuracy >= 0 && c.min_accuracy <= 1)) usage("--min-accuracy: a number in [0, 1]");
    } else if (a == "--optimizers") {
      c.optimizers.clear();
      std::stringstream ss(value(i));
      for (std::string name; std::getline(ss, name, ',');)
        if (!name.empty()) c.optimizers.push_back(name);
      if (c.optimizers.empty()) usage("--optimizers: empty list");
    } else if (a == "--quick") c.quick = true;
    else if (a == "-h" || a == "--help") {
      std::printf("see the header comment of examples/00-demo-fashion-mnist/main.cpp\n");
      std::exit(0);
    } else usage(("unknown argument " + a).c_str());
  }
  if (c.quick) {  // seconds, for ctest: a subset, one epoch
    if (!explicit_epochs) c.epochs = 1;
    if (!explicit_train) c.train_limit = 6400;
    if (!explicit_test) c.test_limit = 2000;
    c.log_every = std::min(c.log_every, 5);
  }
  if (c.min_accuracy < 0) c.min_accuracy = c.quick ? 0.50 : 0.80;
  if (c.epochs < 1 || c.batch < 1 || c.log_every < 1) usage("--epochs, --batch and --log-every must be >= 1");
  return c;
}

}  // namespace

int main(int argc, char** argv) {
  const Config cfg = parse(argc, argv);
  std::vector<Recipe> recipes;
  try {
    for (const auto& name : cfg.optimizers) recipes.push_back(recipe_for(name, 128));
  } catch (const std::exception& e) {
    usage(e.what());
  }
  if (!fmnist::available(cfg.data_dir)) {
    std::fprintf(stderr,
                 "dion_demo: Fashion-MNIST not found in %s\n"
                 "  Debian: apt-get install dataset-fashion-mnist (./scripts/demo does it), or pass --data DIR\n",
                 cfg.data_dir.c_str());
    return 77;
  }
  try {
    const auto t0 = Clock::now();
    Data d{fmnist::load(cfg.data_dir, "train", cfg.train_limit), fmnist::load(cfg.data_dir, "t10k", cfg.test_limit)};
    if (d.train.count < cfg.batch) usage("--train is smaller than one batch");
    std::printf("dion %s demo: Fashion-MNIST from %s (%lld train / %lld test images, loaded in %.1f s)\n",
                dion::version_string, cfg.data_dir.c_str(), static_cast<long long>(d.train.count),
                static_cast<long long>(d.test.count), seconds_since(t0));
    std::printf("model: MLP 784-256-128-10 (%lld parameters); %d epoch(s) of %lld steps, batch %d, seed %llu, "
                "one thread; lr decays linearly to 0\n\n",
                static_cast<long long>(mlp::Model({fmnist::kImageSize, 256, 128, fmnist::kClasses}, 0).num_params()),
                cfg.epochs, static_cast<long long>(d.train.count / cfg.batch), cfg.batch,
                static_cast<unsigned long long>(cfg.seed));

    std::vector<RunResult> results;
    for (const auto& r : recipes) {
      std::printf("%s: %s\n", r.label.c_str(), describe(r).c_str());
      results.push_back(run(r, d, cfg));
    }
    const double total = seconds_since(t0);
    const std::string md = table(results);
    std::printf("\n%s\n", md.c_str());
    write_outputs(results, cfg, d, total, md);
    std::printf("total %.1f s; results in %s/ (summary.csv, losses.csv, results.json, table.md)\n", total,
                cfg.out_dir.c_str());

    int failures = 0;
    for (const auto& r : results) {
      if (!(r.final_train_loss < r.first_loss)) {
        std::fprintf(stderr, "FAILED: %s did not lower the training loss (%.4f -> %.4f)\n", r.recipe.label.c_str(),
                     r.first_loss, r.final_train_loss);
        ++failures;
      }
      if (!(r.test_accuracy >= cfg.min_accuracy)) {
        std::fprintf(stderr, "FAILED: %s test accuracy %.2f%% is below %.0f%%\n", r.recipe.label.c_str(),
                     100.0 * r.test_accuracy, 100.0 * cfg.min_accuracy);
        ++failures;
      }
    }
    return failures == 0 ? 0 : 1;
  } catch (const dion::Error& e) {
    std::fprintf(stderr, "dion_demo: dion error: %s\n", e.what());
  } catch (const std::exception& e) {
    std::fprintf(stderr, "dion_demo: %s\n", e.what());
  }
  return 1;
}
