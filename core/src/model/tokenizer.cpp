#include "ptqlab/model/tokenizer.hpp"

#include <sentencepiece_processor.h>

#include <fmt/format.h>

#include "ptqlab/support/error.hpp"

namespace ptqlab {

Tokenizer::Tokenizer(const std::filesystem::path& model_file)
    : sp_(std::make_unique<sentencepiece::SentencePieceProcessor>()) {
  if (!std::filesystem::is_regular_file(model_file))
    throw Error(fmt::format("{}: tokenizer model not found", model_file.string()));
  const auto status = sp_->Load(model_file.string());
  if (!status.ok())
    throw Error(fmt::format("{}: not a valid SentencePiece model ({})", model_file.string(), status.ToString()));
}

Tokenizer::~Tokenizer() = default;
Tokenizer::Tokenizer(Tokenizer&&) noexcept = default;
Tokenizer& Tokenizer::operator=(Tokenizer&&) noexcept = default;

std::vector<int> Tokenizer::encode(std::string_view text) const {
  std::vector<int> ids;
  const auto status = sp_->Encode(absl::string_view(text.data(), text.size()), &ids);
  if (!status.ok()) throw Error(fmt::format("tokenizer: cannot encode text ({})", status.ToString()));
  return ids;
}

std::string Tokenizer::decode(const std::vector<int>& ids) const {
  std::string out;
  const auto status = sp_->Decode(ids, &out);
  if (!status.ok()) throw Error(fmt::format("tokenizer: cannot decode ids ({})", status.ToString()));
  return out;
}

std::string Tokenizer::piece(int id) const { return sp_->IdToPiece(id); }
int Tokenizer::vocab_size() const { return sp_->GetPieceSize(); }
int Tokenizer::bos_id() const { return sp_->bos_id(); }
int Tokenizer::eos_id() const { return sp_->eos_id(); }

}  // namespace ptqlab
