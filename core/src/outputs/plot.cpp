#include "ptqlab/outputs/plot.hpp"

#include <fcntl.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cctype>
#include <cerrno>
#include <cmath>
#include <cstdlib>
#include <fstream>
#include <map>
#include <optional>
#include <set>

#include <fmt/format.h>
#include <fmt/ranges.h>

#include "ptqlab/outputs/report.hpp"
#include "ptqlab/outputs/results.hpp"
#include "ptqlab/support/error.hpp"

#include <yaml-cpp/yaml.h>

namespace ptqlab {

std::vector<std::size_t> pareto_front(const std::vector<PlotPoint>& points) {
  std::vector<std::size_t> order;
  for (std::size_t i = 0; i < points.size(); ++i)
    if (std::isfinite(points[i].bits) && std::isfinite(points[i].value)) order.push_back(i);
  std::stable_sort(order.begin(), order.end(), [&](std::size_t a, std::size_t b) {
    if (points[a].bits != points[b].bits) return points[a].bits < points[b].bits;
    return points[a].value < points[b].value;
  });
  // Sweep by bits: a point is on the front when its value beats every point with fewer bits.
  // Among equal bits the lowest value comes first; an exact duplicate of the last front point
  // is not dominated either (neither is strictly better), so it stays.
  std::vector<std::size_t> front;
  double best = INFINITY;
  for (std::size_t i : order) {
    const auto& p = points[i];
    if (p.value < best) {
      front.push_back(i);
      best = p.value;
    } else if (!front.empty() && p.value == best && p.bits == points[front.back()].bits) {
      front.push_back(i);
    }
  }
  return front;
}

namespace {

// Runs `program args...` in `dir`; returns its exit status (127 when it cannot be started) and
// its combined stdout/stderr.
std::pair<int, std::string> run_program(const std::string& program, const std::vector<std::string>& args,
                                        const std::filesystem::path& dir) {
  int fds[2];
  if (::pipe(fds) != 0) throw Error("cannot create a pipe to run " + program);
  const pid_t pid = ::fork();
  if (pid < 0) throw Error("cannot fork to run " + program);
  if (pid == 0) {
    ::close(fds[0]);
    ::dup2(fds[1], 1);
    ::dup2(fds[1], 2);
    const int null = ::open("/dev/null", O_RDONLY);
    if (null >= 0) ::dup2(null, 0);
    if (!dir.empty() && ::chdir(dir.c_str()) != 0) ::_exit(126);
    std::vector<char*> argv;
    argv.push_back(const_cast<char*>(program.c_str()));
    for (const auto& a : args) argv.push_back(const_cast<char*>(a.c_str()));
    argv.push_back(nullptr);
    ::execvp(program.c_str(), argv.data());
    ::_exit(127);
  }
  ::close(fds[1]);
  std::string output;
  char buf[4096];
  for (;;) {
    const auto n = ::read(fds[0], buf, sizeof buf);
    if (n > 0) output.append(buf, static_cast<std::size_t>(n));
    else if (n == 0 || errno != EINTR) break;
  }
  ::close(fds[0]);
  int status = 0;
  while (::waitpid(pid, &status, 0) < 0 && errno == EINTR) {
  }
  return {WIFEXITED(status) ? WEXITSTATUS(status) : 128, output};
}

std::string first_line(const std::string& text) {
  const auto start = text.find_first_not_of(" \n\r\t");
  if (start == std::string::npos) return "";
  return text.substr(start, text.find('\n', start) - start);
}

std::string safe_name(const std::string& s) {
  std::string out = s;
  for (char& c : out)
    if (!(std::isalnum(static_cast<unsigned char>(c)) || c == '.' || c == '_' || c == '-')) c = '_';
  return out;
}

// gnuplot double-quoted string: backslashes and quotes escaped.
std::string gp_quote(const std::string& s) {
  std::string out = "\"";
  for (char c : s) {
    if (c == '"' || c == '\\') out += '\\';
    out += c;
  }
  return out + "\"";
}

std::string num(double v) { return fmt::format("{:.17g}", v); }

// One method's point in one plot.
struct MethodPoint {
  std::string method;
  bool allocated = false;  // a mixed-precision arm: its own front
  std::vector<double> bits, values;
  std::vector<std::string> statuses;
};

double mean_of(const std::vector<double>& v) {
  double s = 0;
  for (double x : v) s += x;
  return s / static_cast<double>(v.size());
}

double std_of(const std::vector<double>& v) {
  if (v.size() < 2) return 0;
  const double m = mean_of(v);
  double s = 0;
  for (double x : v) s += (x - m) * (x - m);
  return std::sqrt(s / static_cast<double>(v.size() - 1));
}

struct Terminal {
  const char* ext;
  const char* setting;
};

Terminal terminal_of(const std::string& format) {
  if (format == "png") return {"png", "pngcairo size 1000,700 font \"sans,11\" noenhanced"};
  if (format == "svg") return {"svg", "svg size 1000,700 font \"sans,11\" noenhanced"};
  return {"pdf", "pdfcairo size 7in,4.9in font \"sans,9\" noenhanced"};
}

// The plot's axis ranges, fixed in the script (log2 bits, log10 value) so that label placement
// knows where everything lands.
struct Frame {
  double x0 = 0, x1 = 1, y0 = 0, y1 = 1;
  double nx(double bits) const { return (std::log2(bits) - x0) / (x1 - x0); }
  double ny(double value) const { return (std::log10(value) - y0) / (y1 - y0); }
};

Frame frame_of(const std::vector<double>& bits, const std::vector<double>& lows, const std::vector<double>& highs) {
  Frame f;
  double xl = INFINITY, xh = -INFINITY, yl = INFINITY, yh = -INFINITY;
  for (double b : bits) xl = std::min(xl, std::log2(b)), xh = std::max(xh, std::log2(b));
  for (double v : lows) yl = std::min(yl, std::log10(v));
  for (double v : highs) yh = std::max(yh, std::log10(v));
  const double xs = std::max(xh - xl, 1.0);
  f.x0 = xl - 0.05 * xs;
  f.x1 = xh + 0.2 * xs;  // room for the labels of the right-most points
  f.y0 = std::floor(yl - 0.05);
  f.y1 = std::ceil(yh + 0.25 * std::max(yh - yl, 0.5));  // room for the key above the points
  return f;
}

// Label positions (normalized plot coordinates of each label's left edge and vertical centre)
// that avoid the other labels, the points, the key (top right) and the note (bottom left):
// candidates right/left of the point, then further up or down, the first free one wins.
std::vector<std::pair<double, double>> place_labels(const std::vector<std::pair<double, double>>& pts,
                                                    const std::vector<std::string>& labels, bool note) {
  struct Box {
    double x0, x1, y0, y1;
    bool hits(const Box& o) const { return x0 < o.x1 && o.x0 < x1 && y0 < o.y1 && o.y0 < y1; }
  };
  const double cw = 7.0 / 860, ch = 14.0 / 580, gap = 0.012;  // ~ a 9 pt character in a 1000x700 image
  std::vector<Box> taken = {{0.66, 1.0, 0.88, 1.0}};          // the key
  if (note) taken.push_back({0.0, 0.8, 0.0, 0.06});
  for (const auto& [x, y] : pts) taken.push_back({x - 0.01, x + 0.01, y - 0.015, y + 0.015});
  std::vector<std::pair<double, double>> out;
  for (std::size_t i = 0; i < pts.size(); ++i) {
    const auto [x, y] = pts[i];
    const double w = cw * static_cast<double>(labels[i].size());
    std::optional<Box> chosen;
    for (double dy : {0.6, -0.6, 1.6, -1.6, 2.6, -2.6, 3.6, -3.6})
      for (bool right : {true, false}) {
        const double left = right ? x + gap : x - gap - w, mid = y + dy * ch;
        const Box b{left, left + w, mid - ch / 2, mid + ch / 2};
        if (chosen || b.x0 < 0 || b.x1 > 1 || b.y0 < 0 || b.y1 > 1) continue;
        bool free = true;
        for (const auto& t : taken) free = free && !b.hits(t);
        if (free) chosen = b;
      }
    if (!chosen) chosen = Box{x + gap, x + gap + w, y + 0.6 * ch - ch / 2, y + 0.6 * ch + ch / 2};
    taken.push_back(*chosen);
    out.push_back({chosen->x0, (chosen->y0 + chosen->y1) / 2});
  }
  return out;
}

void write_file(const std::filesystem::path& path, const std::string& text) {
  std::ofstream f(path);
  f << text;
  if (!f.flush()) throw Error(fmt::format("{}: cannot write", path.string()));
}

}  // namespace

std::vector<PlotOutput> make_plots(const std::vector<std::filesystem::path>& inputs, const PlotOptions& o) {
  if (o.formats.empty()) throw Error("--format: give at least one of png, svg, pdf");
  std::set<std::string> seen_formats;
  for (const auto& f : o.formats) {
    if (f != "png" && f != "svg" && f != "pdf") throw Error(fmt::format("--format '{}': must be png, svg or pdf", f));
    if (!seen_formats.insert(f).second) throw Error(fmt::format("--format '{}' is given twice", f));
  }
  if (o.x != "all-in" && o.x != "paper") throw Error(fmt::format("--x '{}': must be all-in or paper", o.x));
  if (std::filesystem::exists(o.out) && !std::filesystem::is_directory(o.out))
    throw Error(fmt::format("{}: --out exists and is not a directory", o.out.string()));

  std::string gnuplot = o.gnuplot;
  if (gnuplot.empty()) {
    const char* env = std::getenv("PTQLAB_GNUPLOT");
    gnuplot = env != nullptr && *env != '\0' ? env : "gnuplot";
  }
  const auto [version_status, version_text] = run_program(gnuplot, {"--version"}, {});
  if (version_status != 0)
    throw Error(fmt::format("gnuplot not found or not working ('{}' exit status {}): install it with scripts/setup "
                            "(Debian package gnuplot-nox) or set PTQLAB_GNUPLOT",
                            gnuplot, version_status));

  std::vector<ResultEntry> entries;
  for (const auto& f : find_result_files(inputs)) entries.push_back(load_result_entry(f, o.metric));

  // Plots: (model, evaluator/dataset) in sorted order; a failed run without metrics is NaN in
  // every plot of its model (shown in the note).
  std::map<std::string, std::set<std::string>> columns_of_model;
  for (const auto& e : entries)
    for (const auto& [key, v] : e.values) columns_of_model[e.model].insert(key);
  std::map<std::pair<std::string, std::string>, std::vector<MethodPoint>> plots;
  for (const auto& e : entries)
    for (const auto& key : columns_of_model[e.model]) {
      auto it = e.values.find(key);
      if (it == e.values.end() && e.status == "ok") continue;  // not evaluated on this dataset: no point
      auto& methods = plots[{e.model, key}];
      auto m = std::find_if(methods.begin(), methods.end(), [&](const MethodPoint& p) { return p.method == e.method; });
      if (m == methods.end()) m = methods.insert(methods.end(), MethodPoint{e.method, e.allocated, {}, {}, {}});
      m->bits.push_back(o.x == "paper" ? e.bits_paper : e.bits_all_in);
      m->values.push_back(it != e.values.end() ? it->second : std::nan(""));
      m->statuses.push_back(e.status);
    }

  std::filesystem::create_directories(o.out);
  std::vector<PlotOutput> outputs;
  for (const auto& [key, methods] : plots) {
    const auto& [model, column] = key;
    const auto slash = column.find('/');
    const std::string evaluator = column.substr(0, slash), dataset = column.substr(slash + 1);
    PlotOutput out;
    out.stem = safe_name(evaluator == "perplexity" ? model + "-" + dataset : model + "-" + evaluator + "-" + dataset);

    std::vector<PlotPoint> points;
    std::vector<const MethodPoint*> plotted;
    for (const auto& m : methods) {
      const double bits = mean_of(m.bits), value = mean_of(m.values);
      if (std::isfinite(bits) && std::isfinite(value) && value > 0) {
        points.push_back({bits, value});
        plotted.push_back(&m);
        continue;
      }
      if (std::isfinite(bits) && std::isfinite(value)) {  // the y axis is logarithmic: FP's KLD of 0
        out.notes.push_back(fmt::format("{} ({}: not on a log scale)", m.method, num(value)));
        continue;
      }
      std::vector<std::string> parts;
      for (std::size_t i = 0; i < m.values.size(); ++i)
        if (!std::isfinite(m.values[i]))
          parts.push_back(fmt::format("{}{}", std::isnan(m.values[i]) ? "NaN" : (m.values[i] > 0 ? "inf" : "-inf"),
                                      m.statuses[i] == "ok" ? "" : ", " + m.statuses[i]));
      out.notes.push_back(fmt::format("{} ({})", m.method, fmt::format("{}", fmt::join(parts, "; "))));
    }
    std::sort(out.notes.begin(), out.notes.end());
    if (points.empty()) {
      out.notes.insert(out.notes.begin(), "no finite values: nothing plotted");
      outputs.push_back(out);
      continue;
    }
    // Points by bits, so the data file reads like the plot.
    std::vector<std::size_t> by_bits(points.size());
    for (std::size_t i = 0; i < by_bits.size(); ++i) by_bits[i] = i;
    std::stable_sort(by_bits.begin(), by_bits.end(), [&](auto a, auto b) { return points[a].bits < points[b].bits; });
    // With allocated (mixed-precision) arms in the plot, uniform and allocated arms get a front each.
    bool any_allocated = false, any_uniform = false;
    for (const auto* m : plotted) (m->allocated ? any_allocated : any_uniform) = true;
    auto front_of = [&](bool allocated) {
      std::vector<PlotPoint> sub;
      std::vector<std::size_t> index;
      for (std::size_t i = 0; i < points.size(); ++i)
        if (plotted[i]->allocated == allocated) sub.push_back(points[i]), index.push_back(i);
      std::vector<std::size_t> out;
      for (std::size_t j : pareto_front(sub)) out.push_back(index[j]);
      return out;
    };
    const auto front = any_allocated ? front_of(false) : pareto_front(points);
    const auto allocated_front = any_allocated ? front_of(true) : std::vector<std::size_t>{};

    const std::string metric_title = evaluator == "perplexity" && o.metric == "ppl" ? "perplexity" : column + " " + o.metric;
    const std::string x_title =
        fmt::format("bits per weight ({}, log scale)", o.x == "paper" ? "paper convention" : "all-in");
    std::string dat = fmt::format("# ptqlab plot: {} {} ({}) vs {}\n", model, dataset, metric_title, x_title);
    for (const auto& n : out.notes) dat += "# not plotted (non-finite): " + n + "\n";
    dat += "# block 0: one point per method (mean over runs; low/high = mean -/+ sample std, clamped above 0)\n";
    dat += "# label_bits/label_value: where the label's left edge goes (placed to avoid overlaps)\n";
    dat += "# bits\tvalue\tlow\thigh\tstd\truns\tmethod\tlabel_bits\tlabel_value\n";
    std::vector<double> xs, lows, highs, sds;
    for (std::size_t i : by_bits) {
      const double sd = std_of(plotted[i]->values), v = points[i].value;
      xs.push_back(points[i].bits);
      sds.push_back(sd);
      lows.push_back(std::max(v - sd, v * 1e-3));
      highs.push_back(v + sd);
    }
    const Frame frame = frame_of(xs, lows, highs);
    std::vector<std::pair<double, double>> normalized;
    std::vector<std::string> labels;
    for (std::size_t i : by_bits) {
      normalized.push_back({frame.nx(points[i].bits), frame.ny(points[i].value)});
      labels.push_back(plotted[i]->method);
    }
    const auto label_at = place_labels(normalized, labels, !out.notes.empty());
    for (std::size_t k = 0; k < by_bits.size(); ++k) {
      const std::size_t i = by_bits[k];
      const auto& m = *plotted[i];
      const double lx = std::exp2(frame.x0 + label_at[k].first * (frame.x1 - frame.x0));
      const double ly = std::pow(10.0, frame.y0 + label_at[k].second * (frame.y1 - frame.y0));
      dat += fmt::format("{}\t{}\t{}\t{}\t{}\t{}\t{}\t{}\t{}\n", num(points[i].bits), num(points[i].value), num(lows[k]),
                         num(highs[k]), num(sds[k]), m.values.size(), m.method, num(lx), num(ly));
    }
    dat += fmt::format("\n\n# block 1: the Pareto front{} (lowest value for given bits), by bits\n# bits\tvalue\tmethod\n",
                       any_allocated ? " of the uniform arms" : "");
    for (std::size_t i : front) dat += fmt::format("{}\t{}\t{}\n", num(points[i].bits), num(points[i].value), plotted[i]->method);
    if (any_allocated) {
      dat += "\n\n# block 2: the Pareto front of the allocated (mixed-precision) arms, by bits\n# bits\tvalue\tmethod\n";
      for (std::size_t i : allocated_front)
        dat += fmt::format("{}\t{}\t{}\n", num(points[i].bits), num(points[i].value), plotted[i]->method);
    }

    const std::string dat_name = out.stem + ".dat";
    std::string gp = fmt::format(
        "# Made by ptqlab plot from result files. Edit and rerun in this directory: gnuplot {}.gp\n"
        "set datafile separator \"\\t\"\n"
        "set title {} noenhanced\n"
        "set xlabel {}\n"
        "set ylabel {}\n"
        "set logscale y\n"
        "# log2 bits: 1, 2, 4, 8, 16 evenly spaced, so the sub-4-bit methods are not squeezed by FP16\n"
        "set logscale x 2\n"
        "set mxtics 4\n"
        "set grid xtics mxtics ytics\n"
        "set key top right box opaque\n"
        "set xrange [{}:{}]\n"
        "set yrange [{}:{}]\n",
        out.stem, gp_quote(fmt::format("{}: {}", model, dataset)), gp_quote(x_title),
        gp_quote(metric_title + " (log scale)"), num(std::exp2(frame.x0)), num(std::exp2(frame.x1)),
        num(std::pow(10.0, frame.y0)), num(std::pow(10.0, frame.y1)));
    if (!out.notes.empty())
      gp += fmt::format("set label 1 {} at graph 0.01, graph 0.03 left noenhanced font \",9\"\n",
                        gp_quote("not plotted: " + fmt::format("{}", fmt::join(out.notes, ", "))));
    std::string plot_cmd = fmt::format(
        "plot {0} index 0 using 1:2:3:4 with yerrorbars pt 7 ps 1.3 lc rgb \"#1f77b4\" title \"method (mean, ±1 std)\", \\\n"
        "     {0} index 0 using 8:9:7 with labels left font \",9\" noenhanced notitle",
        gp_quote(dat_name));
    if (!any_allocated || any_uniform)
      plot_cmd += fmt::format(", \\\n     {} index 1 using 1:2 with linespoints lw 2 pt 6 ps 2.4 lc rgb \"#d62728\" title {}",
                              gp_quote(dat_name), gp_quote(any_allocated ? "Pareto front (uniform)" : "Pareto front"));
    if (any_allocated)
      plot_cmd += fmt::format(", \\\n     {} index 2 using 1:2 with linespoints lw 2 dt 2 pt 4 ps 2.4 lc rgb \"#2ca02c\" "
                              "title \"Pareto front (allocated)\"",
                              gp_quote(dat_name));
    plot_cmd += "\n";
    for (std::size_t i = 0; i < o.formats.size(); ++i) {
      const auto t = terminal_of(o.formats[i]);
      const std::string image = out.stem + "." + t.ext;
      gp += fmt::format("set terminal {}\nset output {}\n", t.setting, gp_quote(image));
      gp += i == 0 ? plot_cmd : "replot\n";
      out.files.push_back(o.out / image);
    }
    gp += "unset output\n";
    write_file(o.out / dat_name, dat);
    write_file(o.out / (out.stem + ".gp"), gp);
    out.files.insert(out.files.begin(), {o.out / dat_name, o.out / (out.stem + ".gp")});
    const auto [status, text] = run_program(gnuplot, {out.stem + ".gp"}, o.out);
    if (status != 0)
      throw Error(fmt::format("{}: gnuplot failed (exit status {}): {}", (o.out / (out.stem + ".gp")).string(), status,
                              first_line(text)));
    for (const auto& f : out.files)
      if (!std::filesystem::exists(f) || std::filesystem::file_size(f) == 0)
        throw Error(fmt::format("{}: gnuplot did not write it", f.string()));
    outputs.push_back(out);
  }
  return outputs;
}

}  // namespace ptqlab

namespace ptqlab {

std::vector<PlotOutput> make_allocation_heatmaps(const std::vector<std::filesystem::path>& inputs, const PlotOptions& o) {
  std::string gnuplot = o.gnuplot;
  if (gnuplot.empty()) {
    const char* env = std::getenv("PTQLAB_GNUPLOT");
    gnuplot = env != nullptr && *env != '\0' ? env : "gnuplot";
  }
  std::vector<PlotOutput> outputs;
  for (const auto& file : find_result_files(inputs)) {
    const ArmResult r = read_arm_result(file);
    if (!r.allocation) continue;
    const auto& a = *r.allocation;
    const std::size_t K = a.candidates.size();
    std::string model = "model";
    try {
      model = std::filesystem::path(YAML::Load(r.config_yaml)["model"].as<std::string>()).filename().string();
    } catch (const YAML::Exception&) {
    }
    PlotOutput out;
    out.stem = safe_name(model + "-" + r.arm + "-allocation");
    // One cell per (layer, linear): the all-in bits per weight of its unit's chosen candidate.
    const std::vector<std::string> rows = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"};
    int layers = 0;
    std::string dat = fmt::format("# ptqlab plot: allocation of {} ({}, budget {} bits per weight {}, {})\n", r.arm,
                                  a.allocator, a.budget, a.metric, a.status);
    dat += "# layer\tlinear_index\tbits_per_weight\tcandidate\tlinear\n";
    double lo = INFINITY, hi = -INFINITY;
    for (std::size_t u = 0; u < a.units.size(); ++u) {
      const int c = a.choice[u];
      const double bpw = static_cast<double>(a.bits_allin[u * K + c]) / static_cast<double>(a.unit_weights[u]);
      lo = std::min(lo, bpw), hi = std::max(hi, bpw);
      layers = std::max(layers, a.unit_layer[u] + 1);
      std::size_t start = 0;
      const std::string& members = a.unit_linears[u];
      while (start <= members.size()) {
        const auto comma = members.find(',', start);
        const std::string lin = members.substr(start, comma == std::string::npos ? std::string::npos : comma - start);
        const auto row = std::find(rows.begin(), rows.end(), lin) - rows.begin();
        dat += fmt::format("{}\t{}\t{}\t{}\t{}\n", a.unit_layer[u], row, num(bpw), a.candidates[c], lin);
        if (comma == std::string::npos) break;
        start = comma + 1;
      }
    }
    if (!(hi > lo)) hi = lo + 1;
    const std::string dat_name = out.stem + ".dat";
    std::string ytics;
    for (std::size_t i = 0; i < rows.size(); ++i) ytics += fmt::format("{}{} {}", i ? ", " : "", gp_quote(rows[i]), i);
    const double achieved = a.weights > 0 ? a.ledger_allin_bits / static_cast<double>(a.weights) : 0.0;
    std::string gp = fmt::format(
        "# Made by ptqlab plot from {}. Edit and rerun in this directory: gnuplot {}.gp\n"
        "set datafile separator \"\\t\"\n"
        "set title {} noenhanced\n"
        "set xlabel \"decoder layer\"\n"
        "set ylabel \"linear\"\n"
        "set xrange [-0.5:{}]\n"
        "set yrange [6.5:-0.5]\n"
        "set xtics 1\n"
        "set ytics ({})\n"
        "set cblabel \"all-in bits per weight of the chosen candidate\"\n"
        "set cbrange [{}:{}]\n"
        "set palette defined (0 \"#fff5eb\", 1 \"#fd8d3c\", 2 \"#7f2704\")\n"
        "unset key\n",
        file.filename().string(), out.stem,
        gp_quote(fmt::format("{}: {} {} (budget {} {}, achieved {:.4f} all-in, {})", model, r.arm, a.allocator,
                             a.budget, a.metric, achieved, a.status)),
        layers - 0.5, ytics, num(lo), num(hi));
    const std::string plot_cmd = fmt::format(
        "plot {0} using 1:2:3 with image, \\\n"
        "     {0} using 1:2:4 with labels font \",8\" noenhanced\n",
        gp_quote(dat_name));
    for (std::size_t i = 0; i < o.formats.size(); ++i) {
      const auto t = terminal_of(o.formats[i]);
      const std::string image = out.stem + "." + t.ext;
      gp += fmt::format("set terminal {}\nset output {}\n", t.setting, gp_quote(image));
      gp += i == 0 ? plot_cmd : "replot\n";
      out.files.push_back(o.out / image);
    }
    gp += "unset output\n";
    std::filesystem::create_directories(o.out);
    write_file(o.out / dat_name, dat);
    write_file(o.out / (out.stem + ".gp"), gp);
    out.files.insert(out.files.begin(), {o.out / dat_name, o.out / (out.stem + ".gp")});
    const auto [status, text] = run_program(gnuplot, {out.stem + ".gp"}, o.out);
    if (status != 0)
      throw Error(fmt::format("{}: gnuplot failed (exit status {}): {}", (o.out / (out.stem + ".gp")).string(), status,
                              first_line(text)));
    outputs.push_back(out);
  }
  return outputs;
}

}  // namespace ptqlab
