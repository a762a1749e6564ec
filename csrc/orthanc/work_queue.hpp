// The plugin's work queue: Orthanc's callbacks push, worker threads pop.
//
// One pending task per study (the latest wish wins: a study deleted while waiting to be indexed is
// removed, not indexed), and never two workers on the same study at once (a task for a study in
// progress waits until that work is done), so index and remove keep their order with any number of
// workers. A scan (list every study of Orthanc) is a task of its own, queued at most once.
#pragma once

#include <condition_variable>
#include <cstdint>
#include <deque>
#include <mutex>
#include <set>
#include <string>
#include <unordered_map>

namespace clinvla_orthanc {

enum class TaskKind { Index, Remove, Scan, Rescan };

struct Task {
  TaskKind kind = TaskKind::Index;
  std::string study;  // "" for scans
};

class WorkQueue {
 public:
  // false when the queue is stopped.
  bool push(TaskKind kind, const std::string& study) {
    std::lock_guard<std::mutex> lock(mu_);
    if (stopped_) return false;
    const std::string key = (kind == TaskKind::Scan || kind == TaskKind::Rescan) ? std::string() : study;
    auto it = pending_.find(key);
    if (it != pending_.end()) {
      // A rescan (re-embed everything) outranks a scan (only what is missing).
      if (key.empty() && it->second == TaskKind::Scan) it->second = kind;
      else if (!key.empty()) it->second = kind;
    } else {
      pending_[key] = kind;
      order_.push_back(key);
    }
    cv_.notify_one();
    return true;
  }

  // Blocks until a task whose study is not in progress is available (true) or stop() (false).
  // The caller must call done(task) when it has finished.
  bool pop(Task* out) {
    std::unique_lock<std::mutex> lock(mu_);
    for (;;) {
      if (stopped_) return false;
      for (auto it = order_.begin(); it != order_.end(); ++it) {
        if (busy_.count(*it)) continue;
        out->study = *it;
        out->kind = pending_.at(*it);
        pending_.erase(*it);
        busy_.insert(*it);
        order_.erase(it);
        return true;
      }
      cv_.wait(lock);
    }
  }

  void done(const Task& task) {
    std::lock_guard<std::mutex> lock(mu_);
    busy_.erase(task.study);
    cv_.notify_all();
  }

  void stop() {
    std::lock_guard<std::mutex> lock(mu_);
    stopped_ = true;
    cv_.notify_all();
  }

  int64_t pending() const {
    std::lock_guard<std::mutex> lock(mu_);
    return int64_t(order_.size());
  }

  int64_t in_progress() const {
    std::lock_guard<std::mutex> lock(mu_);
    return int64_t(busy_.size());
  }

 private:
  mutable std::mutex mu_;
  std::condition_variable cv_;
  std::deque<std::string> order_;
  std::unordered_map<std::string, TaskKind> pending_;
  std::set<std::string> busy_;
  bool stopped_ = false;
};

}  // namespace clinvla_orthanc
