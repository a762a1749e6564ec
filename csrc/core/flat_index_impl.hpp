// FlatIndex's state, shared by flat_index.cpp (add / remove / search) and io.cpp (save / load).
#pragma once

#include <memory>
#include <mutex>
#include <shared_mutex>
#include <unordered_map>

#include "internal.hpp"

namespace clinvla {

struct FlatIndex::Impl {
  int64_t dim = 0;
  DType dtype = DType::Float32;
  size_t elem = 4;
  int64_t count = 0;
  int64_t next_id = 0;

  // Owned storage, or (after load) views into a read-only file mapping that `mapping` keeps
  // alive; the first change copies the mapped data into owned storage.
  detail::AlignedBuffer vec_owned, id_owned;
  std::shared_ptr<const void> mapping;
  const uint8_t* vec_ptr = nullptr;
  const int64_t* id_ptr = nullptr;

  mutable std::shared_mutex mu;  // searches share it, add / remove / load take it alone
  mutable std::mutex map_mu;     // guards the lazily built id -> row map
  mutable std::unique_ptr<std::unordered_map<int64_t, int64_t>> rows_by_id;

  size_t row_bytes() const { return elem * size_t(dim); }
  void make_owned();
  std::unordered_map<int64_t, int64_t>& id_map() const;  // call with map_mu held or mu held alone
};

}  // namespace clinvla
