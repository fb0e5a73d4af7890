// The zero-shot task files of shared/data/zeroshot, mapped onto lm-eval's prompts
// (research/evaluation.md §2-3, shared/data/zeroshot/README.md). Each loader says how exact the
// mapping is in ZeroShotTask::source.
#include <algorithm>
#include <cctype>
#include <optional>

#include <fmt/format.h>
#include <fmt/ranges.h>
#include <nlohmann/json.hpp>

#include "ptqlab/eval/zeroshot.hpp"
#include "ptqlab/support/error.hpp"
#include "ptqlab/support/text_file.hpp"
#include "ptqlab/support/utf8.hpp"

namespace ptqlab {

namespace {

using nlohmann::json;

struct Line {
  int number;
  std::string text;
};

std::vector<Line> read_lines(const std::filesystem::path& file) {
  const std::string text = read_utf8_text_file(file);
  if (text.empty()) throw Error(fmt::format("{}: empty task file", file.string()));
  std::vector<Line> lines;
  std::size_t pos = 0;
  int number = 1;
  while (pos < text.size()) {
    std::size_t end = text.find('\n', pos);
    if (end == std::string::npos) end = text.size();
    lines.push_back({number++, text.substr(pos, end - pos)});
    pos = end + 1;
  }
  return lines;
}

[[noreturn]] void fail(const std::filesystem::path& file, int line, const std::string& what) {
  throw Error(fmt::format("{}:{}: {}", file.string(), line, what));
}

// One JSON object per line (.jsonl); blank lines are errors (they would shift every item).
std::vector<std::pair<int, json>> read_jsonl(const std::filesystem::path& file) {
  std::vector<std::pair<int, json>> out;
  for (const auto& l : read_lines(file)) {
    json j = json::parse(l.text, nullptr, false);
    if (j.is_discarded() || !j.is_object()) fail(file, l.number, "not a JSON object (expected one object per line)");
    out.emplace_back(l.number, std::move(j));
  }
  return out;
}

const std::string& get_string(const std::filesystem::path& file, int line, const json& j, const char* key) {
  auto it = j.find(key);
  if (it == j.end() || !it->is_string()) fail(file, line, fmt::format("key '{}' missing or not a string", key));
  return it->get_ref<const std::string&>();
}

std::vector<std::string> get_strings(const std::filesystem::path& file, int line, const json& j, const char* key,
                                     std::size_t min_size) {
  auto it = j.find(key);
  if (it == j.end() || !it->is_array() || it->size() < min_size)
    fail(file, line, fmt::format("key '{}' missing or not a list of at least {} strings", key, min_size));
  std::vector<std::string> out;
  for (const auto& v : *it) {
    if (!v.is_string()) fail(file, line, fmt::format("key '{}' holds a non-string", key));
    out.push_back(v.get<std::string>());
  }
  return out;
}

int get_gold(const std::filesystem::path& file, int line, const json& j, std::size_t choices) {
  auto it = j.find("gold");
  if (it == j.end() || !it->is_number_integer()) fail(file, line, "key 'gold' missing or not an integer");
  const auto g = it->get<long long>();
  if (g < 0 || g >= static_cast<long long>(choices))
    fail(file, line, fmt::format("gold {} is not a choice index (0..{})", g, choices - 1));
  return static_cast<int>(g);
}

ZeroShotDoc mc_doc(int line, std::string context, const std::vector<std::string>& choices, int gold) {
  ZeroShotDoc d;
  d.line = line;
  d.contexts = {std::move(context)};
  d.choices = choices;
  for (const auto& c : choices) d.continuations.push_back(" " + c);  // lm-eval's target_delimiter
  d.gold = gold;
  return d;
}

void load_piqa(ZeroShotTask& t, const std::filesystem::path& file) {
  const auto rows = read_jsonl(file);
  if (rows.front().second.contains("goal")) {
    // The PIQA authors' files: valid.jsonl + valid-labels.lst beside it (exact).
    auto labels_file = file.parent_path() / (file.stem().string() + "-labels.lst");
    std::error_code ec;
    if (!std::filesystem::exists(labels_file, ec))
      throw Error(fmt::format("{}: PIQA labels file {} not found beside it", file.string(), labels_file.string()));
    const auto labels = read_lines(labels_file);
    if (labels.size() != rows.size())
      throw Error(fmt::format("{}: {} labels for {} items of {}", labels_file.string(), labels.size(), rows.size(),
                              file.string()));
    t.source = "orig";
    for (std::size_t i = 0; i < rows.size(); ++i) {
      const auto& [line, j] = rows[i];
      if (labels[i].text != "0" && labels[i].text != "1") fail(labels_file, labels[i].number, "label must be 0 or 1");
      t.docs.push_back(mc_doc(line, "Question: " + get_string(file, line, j, "goal") + "\nAnswer:",
                              {get_string(file, line, j, "sol1"), get_string(file, line, j, "sol2")},
                              labels[i].text == "1" ? 1 : 0));
    }
    return;
  }
  // llm-foundry's copy: solutions whitespace-stripped (118 items differ from lm-eval).
  t.source = "llmfoundry-stripped";
  for (const auto& [line, j] : rows) {
    const auto& q = get_string(file, line, j, "query");
    if (q.empty() || q.back() != '\n') fail(file, line, "query must end with a newline (llm-foundry PIQA format)");
    const auto choices = get_strings(file, line, j, "choices", 2);
    t.docs.push_back(mc_doc(line, q.substr(0, q.size() - 1) + "\nAnswer:", choices, get_gold(file, line, j, choices.size())));
  }
}

void load_arc(ZeroShotTask& t, const std::filesystem::path& file) {
  // llm-foundry's ARC: 3-choice items padded by a duplicated distractor; the later copy is dropped.
  t.source = "llmfoundry";
  for (const auto& [line, j] : read_jsonl(file)) {
    const auto all = get_strings(file, line, j, "choices", 2);
    int gold = get_gold(file, line, j, all.size());
    std::vector<std::string> choices;
    for (std::size_t i = 0; i < all.size(); ++i) {
      if (std::find(choices.begin(), choices.end(), all[i]) != choices.end()) {
        if (static_cast<int>(i) == gold) fail(file, line, "the gold choice duplicates an earlier choice");
        if (static_cast<int>(i) < gold) --gold;
        continue;
      }
      choices.push_back(all[i]);
    }
    t.docs.push_back(mc_doc(line, get_string(file, line, j, "query") + "\nAnswer:", choices, gold));
  }
}

// lm-eval's hellaswag preprocess steps 3 and 4 (the dump already did 1 and 2): delete every
// shortest "[...]" span, then one left-to-right pass of "  " -> " ".
std::string hellaswag_clean(const std::string& s) {
  std::string a;
  for (std::size_t i = 0; i < s.size(); ++i) {
    if (s[i] == '[') {
      const auto close = s.find(']', i + 1);
      if (close != std::string::npos) {
        i = close;
        continue;
      }
    }
    a += s[i];
  }
  std::string b;
  for (std::size_t i = 0; i < a.size(); ++i) {
    if (a[i] == ' ' && i + 1 < a.size() && a[i + 1] == ' ') {
      b += ' ';
      ++i;
      continue;
    }
    b += a[i];
  }
  return b;
}

// lm-eval capitalizes ctx_b; the dump lost the ctx_a/ctx_b boundary. Heuristic (evaluation.md
// §3.3): after the label's ": ", the fragment after the last sentence end (.!? then optional
// closing quotes/brackets, then a space) gets its first letter upper-cased when it is lower-case.
std::string hellaswag_capitalize(std::string s) {
  const auto colon = s.find(": ");
  if (colon == std::string::npos) return s;
  std::optional<std::size_t> start;
  for (std::size_t i = colon + 2; i < s.size(); ++i) {
    if (s[i] != '.' && s[i] != '!' && s[i] != '?') continue;
    std::size_t k = i + 1;
    while (k < s.size() && (s[k] == '"' || s[k] == '\'' || s[k] == ')' || s[k] == ']')) ++k;
    if (k < s.size() && s[k] == ' ' && k + 1 < s.size()) start = k + 1;
  }
  if (start && std::islower(static_cast<unsigned char>(s[*start]))) s[*start] = static_cast<char>(std::toupper(s[*start]));
  return s;
}

void load_hellaswag(ZeroShotTask& t, const std::filesystem::path& file) {
  // klosax's text dump: 6 lines per item (context, gold 0-3, four endings); approximate.
  t.source = "klosax-approx";
  const auto lines = read_lines(file);
  if (lines.size() % 6 != 0)
    throw Error(fmt::format("{}: {} lines, not a multiple of 6 (klosax HellaSwag format: context, label, 4 endings)",
                            file.string(), lines.size()));
  for (std::size_t i = 0; i < lines.size(); i += 6) {
    const auto& label = lines[i + 1];
    if (label.text.size() != 1 || label.text[0] < '0' || label.text[0] > '3')
      fail(file, label.number, "label line must be a single digit 0-3 (klosax HellaSwag format)");
    std::vector<std::string> endings;
    for (int k = 0; k < 4; ++k) endings.push_back(hellaswag_clean(lines[i + 2 + k].text));
    t.docs.push_back(mc_doc(lines[i].number, hellaswag_capitalize(hellaswag_clean(lines[i].text)), endings,
                            label.text[0] - '0'));
  }
}

void load_winogrande(ZeroShotTask& t, const std::filesystem::path& file) {
  t.source = "exact";
  for (const auto& [line, j] : read_jsonl(file)) {
    ZeroShotDoc d;
    d.line = line;
    d.contexts = get_strings(file, line, j, "context_options", 2);
    d.choices = d.contexts;
    d.continuations = {" " + get_string(file, line, j, "continuation")};
    d.gold = get_gold(file, line, j, d.contexts.size());
    t.docs.push_back(std::move(d));
  }
}

void load_boolq(ZeroShotTask& t, const std::filesystem::path& file) {
  // llm-foundry's BoolQ lacks SuperGLUE's "<title> -- " passage prefix: approximate.
  t.source = "no-title";
  const std::string passage = "Passage: ", question = "\nQuestion: ";
  for (const auto& [line, j] : read_jsonl(file)) {
    const auto& q = get_string(file, line, j, "query");
    const auto split = q.rfind(question);
    if (q.rfind(passage, 0) != 0 || split == std::string::npos || split < passage.size())
      fail(file, line, "query must read 'Passage: <p>\\nQuestion: <q>' (llm-foundry BoolQ format)");
    const auto choices = get_strings(file, line, j, "choices", 2);
    if (choices != std::vector<std::string>{"no", "yes"}) fail(file, line, "choices must be [\"no\", \"yes\"]");
    t.docs.push_back(mc_doc(line,
                            q.substr(passage.size(), split - passage.size()) + question +
                                q.substr(split + question.size()) + "\nAnswer:",
                            choices, get_gold(file, line, j, choices.size())));
  }
}

void load_lambada(ZeroShotTask& t, const std::filesystem::path& file) {
  t.source = "exact";
  for (const auto& [line, j] : read_jsonl(file)) {
    ZeroShotDoc d;
    d.line = line;
    d.contexts = {get_string(file, line, j, "context")};
    const auto& target = get_string(file, line, j, "continuation");
    if (target.empty()) fail(file, line, "empty continuation");
    d.continuations = {" " + target};  // lm-eval: target = " " + last word; no delimiter added
    d.choices = {target};
    t.docs.push_back(std::move(d));
  }
}

void load_openbookqa(ZeroShotTask& t, const std::filesystem::path& file) {
  t.source = "exact";
  for (const auto& [line, j] : read_jsonl(file)) {
    const auto choices = get_strings(file, line, j, "choices", 2);
    t.docs.push_back(mc_doc(line, get_string(file, line, j, "query"), choices, get_gold(file, line, j, choices.size())));
  }
}

}  // namespace

const std::vector<std::string>& zeroshot_task_names() {
  static const std::vector<std::string> names = {"piqa",       "arc_easy", "arc_challenge",  "hellaswag",
                                                 "winogrande", "boolq",    "openbookqa", "lambada_openai"};
  return names;
}

std::string zeroshot_task_of(const std::string& dataset) {
  for (const auto& t : zeroshot_task_names())
    if (dataset == t || dataset.rfind(t + "-", 0) == 0) return t;
  return {};
}

ZeroShotTask load_zeroshot_task(const std::string& task, const std::filesystem::path& file) {
  ZeroShotTask t;
  t.name = task;
  if (task == "piqa") {
    load_piqa(t, file);
    t.acc_norm = true;
  } else if (task == "arc_easy" || task == "arc_challenge") {
    load_arc(t, file);
    t.acc_norm = true;
  } else if (task == "hellaswag") {
    load_hellaswag(t, file);
    t.acc_norm = true;
  } else if (task == "winogrande") {
    load_winogrande(t, file);
    t.kind = ZeroShotKind::multiple_input;
  } else if (task == "boolq") {
    load_boolq(t, file);
    t.version = 2.0;
  } else if (task == "lambada_openai") {
    load_lambada(t, file);
    t.kind = ZeroShotKind::loglikelihood;
  } else if (task == "openbookqa") {
    load_openbookqa(t, file);
    t.acc_norm = true;
  } else {
    throw Error(fmt::format("unknown zero-shot task '{}' (known: {})", task, fmt::join(zeroshot_task_names(), ", ")));
  }
  if (t.docs.empty()) throw Error(fmt::format("{}: no items", file.string()));
  if (t.kind != ZeroShotKind::loglikelihood) {
    double chance = 0;
    for (const auto& d : t.docs) chance += 1.0 / static_cast<double>(d.choices.size());
    t.chance = chance / static_cast<double>(t.docs.size());
  }
  return t;
}

}  // namespace ptqlab
