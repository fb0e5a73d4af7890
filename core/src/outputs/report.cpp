#include "ptqlab/outputs/report.hpp"

#include <algorithm>
#include <cmath>
#include <map>
#include <regex>
#include <set>

#include <fmt/format.h>
#include <fmt/ranges.h>
#include <yaml-cpp/yaml.h>

#include "ptqlab/eval/zeroshot.hpp"
#include "ptqlab/outputs/plot.hpp"
#include "ptqlab/outputs/results.hpp"
#include "ptqlab/support/error.hpp"

namespace ptqlab {
namespace {

using Entry = ResultEntry;

// Flattens the arm's components into "kind.param" switches for the ablation layout.
void collect_switches(const YAML::Node& arm, std::map<std::string, std::string>& out) {
  auto component = [&](const std::string& prefix, const YAML::Node& c) {
    if (!c || !c.IsMap()) return;
    if (c["name"]) out[prefix] = c["name"].as<std::string>();
    if (c["params"] && c["params"].IsMap())
      for (const auto& p : c["params"]) out[prefix + "." + p.first.as<std::string>()] = p.second.as<std::string>();
  };
  component("quantizer", arm["quantizer"]);
  component("mask", arm["mask"]);
  if (arm["preprocess"] && arm["preprocess"].IsSequence())
    for (std::size_t i = 0; i < arm["preprocess"].size(); ++i)
      component(fmt::format("preprocess.{}", i), arm["preprocess"][i]);
}

}  // namespace

namespace {
const std::string kZeroShotAvg = "\x1f" "avg";  // the key of a model's zero-shot average column
// "preprocessed:zeroshot" -> "zeroshot"
std::string base_evaluator(const std::string& ev) {
  const auto colon = ev.rfind(':');
  return colon == std::string::npos ? ev : ev.substr(colon + 1);
}
}  // namespace

std::string column_metric(const std::string& evaluator, const std::string& metric) {
  if (metric != "ppl") return metric;
  const std::string ev = base_evaluator(evaluator);
  if (ev == "zeroshot") return "acc";
  if (ev == "kl-divergence") return "kld_mean";
  return metric;
}

bool higher_is_better(const std::string& evaluator, const std::string& metric) {
  const std::string m = column_metric(evaluator, metric);
  return m == "acc" || m == "acc_norm" || m == "same_top";
}

std::optional<double> budget_target_bits(const std::string& config_yaml) {
  try {
    const YAML::Node arm = YAML::Load(config_yaml)["arm"];
    // A missing key gives an invalid node, and indexing that throws: look one level at a time.
    for (const char* key : {"budget", "allocation"}) {
      const YAML::Node b = arm[key];
      if (!b || !b.IsMap()) continue;
      const YAML::Node n = b[std::string(key) == "budget" ? "target_bits" : "budget"];
      if (n && n.IsScalar()) return n.as<double>();
    }
  } catch (const YAML::Exception&) {
  }
  return std::nullopt;
}

ResultEntry load_result_entry(const std::filesystem::path& file, const std::string& metric) {
  const ArmResult r = read_arm_result(file);
  Entry e;
  static const std::regex seed_suffix("-seed[0-9]+$");
  e.method = std::regex_replace(r.arm, seed_suffix, "");
  e.status = r.status;
  e.bits_paper = r.total_bits.paper_per_weight();
  e.bits_all_in = r.total_bits.all_in_per_weight();
  try {
    const YAML::Node cfg = YAML::Load(r.config_yaml);
    e.model = std::filesystem::path(cfg["model"].as<std::string>()).filename().string();
    collect_switches(cfg["arm"], e.switches);
    e.target_bits = budget_target_bits(r.config_yaml);
    e.allocated = r.allocation.has_value();
  } catch (const YAML::Exception& ex) {
    throw Error(fmt::format("{}: the stored /config is not valid YAML ({})", file.string(), ex.what()));
  }
  for (const auto& [ev, datasets] : r.metrics)
    for (const auto& [ds, metrics] : datasets) {
      const std::string m = column_metric(ev, metric);
      const bool percent = m != metric;  // zero-shot accuracy, as papers print it
      auto it = metrics.find(m);
      if (it != metrics.end()) e.values[ev + "/" + ds] = percent && m == "acc" ? 100.0 * it->second : it->second;
      if (percent && m == "acc" && metrics.count("chance") && metrics.at("chance") > 0)  // not LAMBADA
        e.chance[ev + "/" + ds] = 100.0 * metrics.at("chance");
    }
  // A failed arm has no metrics: keep its cells as NaN so the row shows it.
  return e;
}

namespace {

struct Cell {
  std::vector<double> values;
  bool empty() const { return values.empty(); }
  double mean() const {
    double s = 0;
    for (double v : values) s += v;
    return s / static_cast<double>(values.size());
  }
  double stddev() const {
    if (values.size() < 2) return 0;
    const double m = mean();
    double s = 0;
    for (double v : values) s += (v - m) * (v - m);
    return std::sqrt(s / static_cast<double>(values.size() - 1));
  }
};

std::string number(double v) {
  if (std::isnan(v)) return "NaN";
  if (std::isinf(v)) return v > 0 ? "inf" : "-inf";
  if (std::abs(v) >= 1e6) return fmt::format("{:.2e}", v);
  return fmt::format("{:.2f}", v);
}

std::string latex_escape(const std::string& s) {
  std::string out;
  for (char c : s) {
    if (c == '_' || c == '%' || c == '&' || c == '#' || c == '$' || c == '{' || c == '}') out += '\\';
    out += c;
  }
  return out;
}

std::string csv_field(const std::string& s) {
  if (s.find_first_of(",\"\n") == std::string::npos) return s;
  std::string out = "\"";
  for (char c : s) out += c == '"' ? std::string("\"\"") : std::string(1, c);
  return out + "\"";
}

struct Table {
  std::vector<std::string> header;
  std::vector<std::vector<std::string>> rows;
  std::vector<std::vector<bool>> bold;  // per cell
  std::vector<std::string> notes;
};

std::string render(const Table& t, const std::string& format) {
  std::string out;
  if (format == "csv") {
    for (std::size_t i = 0; i < t.header.size(); ++i) out += (i ? "," : "") + csv_field(t.header[i]);
    out += "\n";
    for (const auto& row : t.rows) {
      for (std::size_t i = 0; i < row.size(); ++i) out += (i ? "," : "") + csv_field(row[i]);
      out += "\n";
    }
    return out;
  }
  if (format == "latex") {
    out += "\\begin{tabular}{l" + std::string(t.header.size() - 1, 'r') + "}\n\\toprule\n";
    for (std::size_t i = 0; i < t.header.size(); ++i) out += (i ? " & " : "") + latex_escape(t.header[i]);
    out += " \\\\\n\\midrule\n";
    for (std::size_t r = 0; r < t.rows.size(); ++r) {
      for (std::size_t i = 0; i < t.rows[r].size(); ++i) {
        std::string cell = latex_escape(t.rows[r][i]);
        if (cell == "–") cell = "--";
        const auto pm = cell.find(" ± ");
        if (pm != std::string::npos) cell = cell.substr(0, pm) + " $\\pm$ " + cell.substr(pm + 4);
        if (t.bold[r][i]) cell = "\\textbf{" + cell + "}";
        out += (i ? " & " : "") + cell;
      }
      out += " \\\\\n";
    }
    out += "\\bottomrule\n\\end{tabular}\n";
    for (const auto& n : t.notes) out += "% " + n + "\n";
    return out;
  }
  // Markdown
  for (std::size_t i = 0; i < t.header.size(); ++i) out += "| " + t.header[i] + " ";
  out += "|\n";
  for (std::size_t i = 0; i < t.header.size(); ++i) out += i == 0 ? "|---" : "|---:";
  out += "|\n";
  for (std::size_t r = 0; r < t.rows.size(); ++r) {
    for (std::size_t i = 0; i < t.rows[r].size(); ++i)
      out += "| " + (t.bold[r][i] ? "**" + t.rows[r][i] + "**" : t.rows[r][i]) + " ";
    out += "|\n";
  }
  if (!t.notes.empty()) out += "\n";
  for (const auto& n : t.notes) out += n + "\n";
  return out;
}

std::string bits_text(const std::vector<double>& values) {
  if (values.empty()) return "–";
  const auto [lo, hi] = std::minmax_element(values.begin(), values.end());
  if (*hi - *lo < 0.0005) return fmt::format("{:.3f}", *lo);
  return fmt::format("{:.3f}–{:.3f}", *lo, *hi);
}

}  // namespace

std::vector<std::filesystem::path> find_result_files(const std::vector<std::filesystem::path>& inputs) {
  std::vector<std::filesystem::path> files;
  for (const auto& in : inputs) {
    if (std::filesystem::is_regular_file(in)) {
      files.push_back(in);
    } else if (std::filesystem::is_directory(in)) {
      for (const auto& f : std::filesystem::recursive_directory_iterator(in))
        if (f.is_regular_file() && f.path().extension() == ".h5" && f.path().filename().string()[0] != '.')
          files.push_back(f.path());
    } else {
      throw Error(fmt::format("{}: no such result file or directory", in.string()));
    }
  }
  std::sort(files.begin(), files.end());
  if (files.empty()) {
    std::string where;
    for (const auto& in : inputs) where += (where.empty() ? "" : ", ") + in.string();
    throw Error(fmt::format("no result files (*.h5) found in {}", where));
  }
  return files;
}

std::string make_report(const std::vector<std::filesystem::path>& inputs, const ReportOptions& o) {
  if (o.format == "lm-eval-json") {  // one arm, lm-eval's layout
    const auto files = find_result_files(inputs);
    if (files.size() != 1)
      throw Error(fmt::format("--format lm-eval-json writes one arm: give one result file, not {} ({}, ...)",
                              files.size(), files.front().string()));
    return lmeval_results_json(files.front());
  }
  if (o.format != "md" && o.format != "latex" && o.format != "csv")
    throw Error(fmt::format("--format '{}': must be md, latex, csv or lm-eval-json", o.format));
  if (o.layout != "paper" && o.layout != "ablation" && o.layout != "long")
    throw Error(fmt::format("--layout '{}': must be paper, ablation or long", o.layout));
  std::vector<Entry> entries;
  for (const auto& f : find_result_files(inputs)) entries.push_back(load_result_entry(f, o.metric));

  // Metric columns: (model, evaluator/dataset) in first-seen order.
  std::vector<std::pair<std::string, std::string>> columns;
  std::set<std::pair<std::string, std::string>> seen;
  for (const auto& e : entries)
    for (const auto& [key, v] : e.values)
      if (seen.insert({e.model, key}).second) columns.push_back({e.model, key});
  std::stable_sort(columns.begin(), columns.end());
  // Papers' layout: perplexity columns, then zero-shot tasks in the papers' order and their
  // average (per model), then KL divergence.
  auto kind_rank = [&](const std::string& key) {
    const std::string ev = base_evaluator(key.substr(0, key.find('/')));
    if (o.metric != "ppl") return 0;
    return ev == "zeroshot" ? 1 : ev == "kl-divergence" ? 3 : 0;
  };
  auto task_rank = [&](const std::string& key) {
    const std::string ds = key.substr(key.find('/') + 1);
    const auto& names = zeroshot_task_names();
    const auto it = std::find(names.begin(), names.end(), zeroshot_task_of(ds));
    return static_cast<long>(it - names.begin());
  };
  std::stable_sort(columns.begin(), columns.end(), [&](const auto& a, const auto& b) {
    if (a.first != b.first) return a.first < b.first;
    const int ka = kind_rank(a.second), kb = kind_rank(b.second);
    if (ka != kb) return ka < kb;
    if (ka == 1 && task_rank(a.second) != task_rank(b.second)) return task_rank(a.second) < task_rank(b.second);
    return a.second < b.second;
  });
  // A zero-shot average column per model after its last zero-shot column (key "zeroshot-avg").
  if (o.layout != "long" && o.metric == "ppl") {
    for (std::size_t i = columns.size(); i-- > 0;) {
      if (kind_rank(columns[i].second) != 1) continue;
      if (i + 1 < columns.size() && columns[i + 1].first == columns[i].first && kind_rank(columns[i + 1].second) == 1)
        continue;
      columns.insert(columns.begin() + static_cast<std::ptrdiff_t>(i) + 1, {columns[i].first, kZeroShotAvg});
    }
  }
  auto column_title = [&](const std::pair<std::string, std::string>& c) {
    if (c.second == kZeroShotAvg) return fmt::format("{} zero-shot avg", c.first);
    const auto slash = c.second.find('/');
    const std::string ev = c.second.substr(0, slash), ds = c.second.substr(slash + 1);
    if (o.metric == "ppl" && base_evaluator(ev) == "zeroshot")
      return fmt::format("{} {}{} acc", c.first, ev == "zeroshot" ? "" : ev.substr(0, ev.rfind(':') + 1), ds);
    if (o.metric == "ppl" && base_evaluator(ev) == "kl-divergence")
      return fmt::format("{} {}{} KLD", c.first, ev == "kl-divergence" ? "" : ev.substr(0, ev.rfind(':') + 1), ds);
    return fmt::format("{} {}", c.first, ev == "perplexity" && o.metric == "ppl" ? ds : c.second);
  };

  Table t;
  if (o.layout == "long") {
    t.header = {"method", "model", "evaluator", "dataset", "metric", "n", "mean", "std", "status"};
    std::map<std::tuple<std::string, std::string, std::string>, Cell> cells;
    std::map<std::tuple<std::string, std::string, std::string>, std::string> status;
    std::vector<std::tuple<std::string, std::string, std::string>> order;
    for (const auto& e : entries) {
      for (const auto& [key, v] : e.values) {
        auto k = std::make_tuple(e.method, e.model, key);
        if (!cells.count(k)) order.push_back(k);
        cells[k].values.push_back(v);
        status[k] = status[k].empty() || status[k] == e.status ? e.status : "mixed";
      }
      if (e.values.empty()) {
        auto k = std::make_tuple(e.method, e.model, std::string("-/-"));
        if (!cells.count(k)) order.push_back(k);
        cells[k].values.push_back(std::nan(""));
        status[k] = e.status;
      }
    }
    const bool csv = o.format == "csv";
    auto num = [csv](double v) { return csv ? fmt::format("{}", v) : number(v); };
    for (const auto& k : order) {
      const auto& c = cells[k];
      const auto& key = std::get<2>(k);
      const auto slash = key.find('/');
      t.rows.push_back({std::get<0>(k), std::get<1>(k), key.substr(0, slash), key.substr(slash + 1), o.metric,
                        std::to_string(c.values.size()), num(c.mean()), num(c.stddev()), status[k]});
      t.bold.push_back(std::vector<bool>(t.header.size(), false));
    }
    return render(t, o.format);
  }

  // paper / ablation: one row per method (paper) or per switch combination (ablation).
  std::vector<std::string> varying;
  if (o.layout == "ablation") {
    std::map<std::string, std::set<std::string>> values;
    for (const auto& e : entries)
      for (const auto& [k, v] : e.switches) values[k].insert(v);
    // A switch varies when arms that have it disagree on its value; a parameter only some
    // components have (and agree on) is not a switch of this ablation. Component names always are.
    for (const auto& [k, vs] : values) {
      const bool is_name = k.find('.') == std::string::npos || k.rfind("preprocess.", 0) == 0;
      bool everywhere = true;
      for (const auto& e : entries) everywhere = everywhere && e.switches.count(k);
      if (vs.size() > 1 || (is_name && !everywhere)) varying.push_back(k);
    }
  }
  auto row_key = [&](const Entry& e) {
    if (o.layout == "paper") return e.method;
    std::string key;
    for (const auto& k : varying) key += "\x1f" + (e.switches.count(k) ? e.switches.at(k) : "–");
    return key;
  };
  std::vector<std::string> row_order;
  std::map<std::string, std::vector<const Entry*>> groups;
  for (const auto& e : entries) {
    const auto k = row_key(e);
    if (!groups.count(k)) row_order.push_back(k);
    groups[k].push_back(&e);
  }
  // FP and higher bit widths first, as in paper tables.
  std::stable_sort(row_order.begin(), row_order.end(), [&](const std::string& a, const std::string& b) {
    return groups[a].front()->bits_paper > groups[b].front()->bits_paper;
  });

  if (o.layout == "paper") {
    t.header = {"method"};
  } else {
    for (const auto& k : varying) t.header.push_back(k);
  }
  t.header.push_back("bits (paper)");
  t.header.push_back("bits (all-in)");
  // Budget arms: the all-in target next to what was achieved (only when some arm has one).
  bool any_budget = false;
  for (const auto& e : entries) any_budget = any_budget || e.target_bits.has_value();
  if (any_budget) t.header.push_back("target bits");
  for (const auto& c : columns) t.header.push_back(column_title(c));
  if (o.format == "csv") {
    t.header.push_back("seeds");
    t.header.push_back("status");
  }

  std::vector<std::vector<Cell>> cells(row_order.size(), std::vector<Cell>(columns.size()));
  std::vector<double> row_all_in(row_order.size(), 0.0);  // mean all-in bits per row (Pareto notes)
  for (std::size_t r = 0; r < row_order.size(); ++r) {
    const auto& g = groups[row_order[r]];
    std::vector<double> paper, all_in, targets;
    std::set<std::string> statuses;
    std::vector<std::string> row;
    if (o.layout == "paper") {
      row.push_back(g.front()->method);
    } else {
      for (const auto& k : varying)
        row.push_back(g.front()->switches.count(k) ? g.front()->switches.at(k) : (o.format == "csv" ? "" : "–"));
    }
    for (const auto* e : g) {
      paper.push_back(e->bits_paper);
      all_in.push_back(e->bits_all_in);
      row_all_in[r] += e->bits_all_in / static_cast<double>(g.size());
      if (e->target_bits) targets.push_back(*e->target_bits);
      statuses.insert(e->status);
      for (std::size_t c = 0; c < columns.size(); ++c) {
        if (e->model != columns[c].first) continue;
        if (columns[c].second == kZeroShotAvg) {  // the mean of this arm's zero-shot columns of the model
          double sum = 0;
          int n = 0;
          for (const auto& [key, v] : e->values)
            if (kind_rank(key) == 1) {
              sum += v;
              ++n;
            }
          if (n > 0) cells[r][c].values.push_back(sum / n);
          continue;
        }
        auto it = e->values.find(columns[c].second);
        if (it != e->values.end()) cells[r][c].values.push_back(it->second);
        else if (e->status != "ok") cells[r][c].values.push_back(std::nan(""));  // a failed run is shown, not dropped
      }
    }
    if (o.format == "csv") {  // numbers a spreadsheet can read: means, full precision
      auto mean = [](const std::vector<double>& v) {
        double s = 0;
        for (double x : v) s += x;
        return s / static_cast<double>(v.size());
      };
      row.push_back(fmt::format("{}", mean(paper)));
      row.push_back(fmt::format("{}", mean(all_in)));
      if (any_budget) row.push_back(targets.empty() ? "" : fmt::format("{}", mean(targets)));
    } else {
      row.push_back(bits_text(paper));
      row.push_back(bits_text(all_in));
      if (any_budget) row.push_back(targets.empty() ? "–" : bits_text(targets));
    }
    std::size_t seeds = 0;
    for (std::size_t c = 0; c < columns.size(); ++c) {
      const auto& cell = cells[r][c];
      seeds = std::max(seeds, cell.values.size());
      if (cell.empty()) row.push_back(o.format == "csv" ? "" : "–");
      else if (o.format == "csv") row.push_back(fmt::format("{}", cell.mean()));
      else if (cell.values.size() > 1) row.push_back(number(cell.mean()) + " ± " + number(cell.stddev()));
      else row.push_back(number(cell.mean()));
    }
    if (o.format == "csv") {
      row.push_back(std::to_string(seeds));
      row.push_back(statuses.size() == 1 ? *statuses.begin() : "mixed");
    }
    t.rows.push_back(row);
    t.bold.push_back(std::vector<bool>(row.size(), false));
  }
  // Bold: the lowest finite mean of each metric column (perplexity-like metrics), the highest of
  // accuracy columns.
  if (o.format != "csv") {
    const std::size_t first = t.header.size() - columns.size();
    for (std::size_t c = 0; c < columns.size(); ++c) {
      const bool high = columns[c].second == kZeroShotAvg ||
                        higher_is_better(columns[c].second.substr(0, columns[c].second.find('/')), o.metric);
      double best = high ? -INFINITY : INFINITY;
      for (std::size_t r = 0; r < cells.size(); ++r)
        if (!cells[r][c].empty() && std::isfinite(cells[r][c].mean()))
          best = high ? std::max(best, cells[r][c].mean()) : std::min(best, cells[r][c].mean());
      for (std::size_t r = 0; r < cells.size(); ++r)
        if (!cells[r][c].empty() && cells[r][c].mean() == best) t.bold[r][first + c] = true;
    }
  }
  // The chance level of each zero-shot column, as a last row (paper layout): these tiny models
  // sit near it on most tasks.
  std::map<std::pair<std::string, std::string>, double> chance_of;
  for (const auto& e : entries)
    for (const auto& [key, v] : e.chance) chance_of[{e.model, key}] = v;
  if (o.layout == "paper" && !chance_of.empty()) {
    std::vector<std::string> row = {"chance"};
    const std::string none = o.format == "csv" ? "" : "–";
    row.push_back(none);
    row.push_back(none);
    if (any_budget) row.push_back(none);
    for (const auto& c : columns) {
      auto it = chance_of.find(c);
      if (it == chance_of.end()) row.push_back(none);
      else row.push_back(o.format == "csv" ? fmt::format("{}", it->second) : number(it->second));
    }
    if (o.format == "csv") {
      row.push_back("");
      row.push_back("");
    }
    t.rows.push_back(row);
    t.bold.push_back(std::vector<bool>(row.size(), false));
  }
  bool any_seeds = false;
  for (const auto& row : cells)
    for (const auto& c : row) any_seeds = any_seeds || c.values.size() > 1;
  if (any_seeds) t.notes.push_back("Cells with several runs show mean ± sample standard deviation over seeds.");
  t.notes.push_back(fmt::format("Metric: {}; bits per weight of the quantized linear layers (docs/bit-accounting.md).", o.metric));
  // With allocated (mixed-precision) arms: the Pareto fronts over all-in bits of the uniform rows
  // and of the allocated rows, per metric column (docs/allocation.md).
  bool any_allocated = false;
  for (const auto& e : entries) any_allocated = any_allocated || e.allocated;
  if (any_allocated && o.format != "csv") {
    for (std::size_t c = 0; c < columns.size(); ++c) {
      std::string note = fmt::format("Pareto fronts over all-in bits, {}:", column_title(columns[c]));
      for (const bool allocated : {false, true}) {
        std::vector<PlotPoint> points;
        std::vector<std::size_t> rows;
        for (std::size_t r = 0; r < row_order.size(); ++r)
          if (groups[row_order[r]].front()->allocated == allocated && !cells[r][c].empty()) {
            points.push_back({row_all_in[r], cells[r][c].mean()});
            rows.push_back(r);
          }
        std::vector<std::string> items;
        for (std::size_t i : pareto_front(points))
          items.push_back(fmt::format("{} ({:.3f}, {})", t.rows[rows[i]][0], points[i].bits, number(points[i].value)));
        note += fmt::format(" {} {};", allocated ? "allocated" : "uniform",
                            items.empty() ? std::string("–") : fmt::format("{}", fmt::join(items, ", ")));
      }
      note.back() = '.';
      t.notes.push_back(note);
    }
  }
  std::map<std::string, double> chance;
  for (const auto& e : entries)
    for (const auto& [key, v] : e.chance) chance[e.model + " " + key.substr(key.find('/') + 1)] = v;
  if (!chance.empty()) {
    std::string line = "Zero-shot columns: lm-eval acc in % (docs/zeroshot.md); chance level:";
    for (const auto& [k, v] : chance) line += fmt::format(" {} {:.2f};", k, v);
    line.back() = '.';
    t.notes.push_back(line);
  }
  return render(t, o.format);
}

}  // namespace ptqlab
