// Starts a real attnserve under `mpirun -np P --oversubscribe` on a free
// loopback port (--listen 127.0.0.1:0 --port-file), for tests and benchmarks.
// Stop() sends SIGTERM to rank 0 (as launch/attnserve does) and returns
// mpirun's exit code. Its files (port, pid, log: tests print log() in their
// failure messages) live in /tmp/attnserve-test-*, removed by the destructor
// unless RINGTREE_KEEP_SERVER_DIRS is set. Not thread-safe; one owner.
#pragma once

#include <dirent.h>
#include <signal.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <string>
#include <thread>
#include <vector>

namespace ringtree::testing {

class ServerProcess {
 public:
  // "NAME=value" settings for every rank (set in mpirun's environment and
  // forwarded with -x), e.g. test hooks.
  std::vector<std::string> env;

  // `attnserve`: path of the binary; `extra`: more flags. Returns false when
  // the server did not become ready within `timeout`.
  // RINGTREE_TEST_ATTNSERVE, when set, names another attnserve binary to run
  // instead (e.g. a build of the code before a fix, to see a test fail).
  bool Start(std::string attnserve, int ranks, const std::vector<std::string>& extra,
             std::chrono::seconds timeout = std::chrono::seconds(60)) {
    if (const char* other = std::getenv("RINGTREE_TEST_ATTNSERVE")) attnserve = other;
    char dir_template[] = "/tmp/attnserve-test-XXXXXX";
    dir_ = mkdtemp(dir_template);
    port_file_ = dir_ + "/port";
    pid_file_ = dir_ + "/pid";
    log_file_ = dir_ + "/log";
    // Open MPI's shared-memory segments in a directory of this server's own:
    // a job killed by a test leaves its segments behind, and a later job whose
    // 16-bit job id happens to match (mpirun pids are reused) attached to
    // them and crashed at start (seen once in a full ctest run).
    shm_dir_ = dir_ + "/shm";
    mkdir(shm_dir_.c_str(), 0700);
    std::vector<std::string> args = {
        "mpirun", "-np",   std::to_string(ranks),         "--oversubscribe", "--bind-to",
        "none",   "--mca", "btl_vader_backing_directory", shm_dir_};
    for (const std::string& e : env) {
      args.push_back("-x");
      args.push_back(e.substr(0, e.find('=')));
    }
    args.insert(args.end(), {attnserve, "--listen", "127.0.0.1:0", "--port-file", port_file_, "--pid-file", pid_file_});
    args.insert(args.end(), extra.begin(), extra.end());
    mpirun_ = fork();
    if (mpirun_ == 0) {
      setsid();  // signals to the test do not reach mpirun
      setenv("OMPI_ALLOW_RUN_AS_ROOT", "1", 1);
      setenv("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1", 1);
      for (const std::string& e : env) {
        const size_t eq = e.find('=');
        setenv(e.substr(0, eq).c_str(), eq == std::string::npos ? "" : e.c_str() + eq + 1, 1);
      }
      FILE* log = std::fopen(log_file_.c_str(), "w");
      if (log) {
        dup2(fileno(log), 1);
        dup2(fileno(log), 2);
      }
      std::vector<char*> argv;
      for (auto& a : args) argv.push_back(a.data());
      argv.push_back(nullptr);
      execvp("mpirun", argv.data());
      _exit(127);
    }
    const auto until = std::chrono::steady_clock::now() + timeout;
    while (std::chrono::steady_clock::now() < until) {
      std::ifstream port(port_file_), pid(pid_file_);
      if (port >> port_ && pid >> rank0_pid_ && port_ > 0) return true;
      int status;
      if (waitpid(mpirun_, &status, WNOHANG) == mpirun_) {
        mpirun_ = -1;
        return false;
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(50));
    }
    return false;
  }

  std::string address() const { return "127.0.0.1:" + std::to_string(port_); }
  int port() const { return port_; }
  pid_t rank0_pid() const { return rank0_pid_; }
  // The job's other ranks on this host: mpirun's children named like rank 0.
  std::vector<pid_t> worker_pids() const {
    std::vector<pid_t> out;
    std::ifstream comm0("/proc/" + std::to_string(rank0_pid_) + "/comm");
    std::string name0;
    comm0 >> name0;
    DIR* proc = mpirun_ > 0 ? opendir("/proc") : nullptr;
    for (dirent* e = proc ? readdir(proc) : nullptr; e != nullptr; e = readdir(proc)) {
      const pid_t pid = static_cast<pid_t>(std::atoi(e->d_name));
      if (pid <= 0) continue;
      std::ifstream stat("/proc/" + std::to_string(pid) + "/stat");
      if (!stat) continue;
      std::string line;
      std::getline(stat, line);
      const size_t close = line.rfind(')');
      const size_t open = line.find('(');
      if (close == std::string::npos || open == std::string::npos) continue;
      const std::string name = line.substr(open + 1, close - open - 1);
      int ppid = 0;
      char state = 0;
      std::sscanf(line.c_str() + close + 1, " %c %d", &state, &ppid);
      if (ppid == mpirun_ && pid != rank0_pid_ && name == name0) out.push_back(pid);
    }
    if (proc) closedir(proc);
    return out;
  }
  std::string log() const {
    std::ifstream in(log_file_);
    return std::string((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  }

  // SIGTERM to rank 0, then waits up to `timeout` for mpirun. Returns its exit
  // code (-1 on timeout: the job is then killed).
  int Stop(std::chrono::seconds timeout = std::chrono::seconds(30)) {
    if (mpirun_ <= 0) return -1;
    if (rank0_pid_ > 0) kill(rank0_pid_, SIGTERM);
    return Wait(timeout);
  }

  int Wait(std::chrono::seconds timeout) {
    const auto until = std::chrono::steady_clock::now() + timeout;
    while (std::chrono::steady_clock::now() < until) {
      int status;
      if (waitpid(mpirun_, &status, WNOHANG) == mpirun_) {
        mpirun_ = -1;
        return WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(50));
    }
    kill(-mpirun_, SIGKILL);
    waitpid(mpirun_, nullptr, 0);
    mpirun_ = -1;
    return -1;
  }

  ~ServerProcess() {
    if (mpirun_ > 0) Stop(std::chrono::seconds(10));
    std::error_code ec;
    if (!shm_dir_.empty()) std::filesystem::remove_all(shm_dir_, ec);  // what a killed job left
    if (!dir_.empty() && !std::getenv("RINGTREE_KEEP_SERVER_DIRS"))
      std::filesystem::remove_all(dir_, ec);
  }

 private:
  std::string dir_, shm_dir_, port_file_, pid_file_, log_file_;
  pid_t mpirun_ = -1;
  pid_t rank0_pid_ = -1;
  int port_ = 0;
};

}  // namespace ringtree::testing
