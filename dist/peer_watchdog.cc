#include "dist/peer_watchdog.h"

#include <arpa/inet.h>
#include <fcntl.h>
#include <ifaddrs.h>
#include <net/if.h>
#include <netinet/in.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cstdio>
#include <cstring>

#include "base/log.h"

namespace ringtree {
namespace {

double Seconds() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

bool WaitFd(int fd, short events, double seconds) {
  pollfd p{fd, events, 0};
  const double end = Seconds() + seconds;
  while (true) {
    const double left = end - Seconds();
    if (left <= 0) return false;
    const int n = poll(&p, 1, static_cast<int>(left * 1000) + 1);
    if (n > 0) return true;
    if (n < 0 && errno != EINTR) return false;
  }
}

}  // namespace

double PeerWatchdog::Now() { return Seconds(); }

std::vector<int> PeerWatchdog::Peers(Topology topology, int rank, int size) {
  std::vector<int> peers;
  if (size < 2) return peers;
  if (topology == Topology::kRing) {
    peers.push_back((rank + 1) % size);
    peers.push_back((rank + size - 1) % size);
  } else if (rank == 0) {
    for (int r = 1; r < size; ++r) peers.push_back(r);
  } else {
    peers.push_back(0);
  }
  std::sort(peers.begin(), peers.end());
  peers.erase(std::unique(peers.begin(), peers.end()), peers.end());
  return peers;
}

Status PeerWatchdog::Connect(int peer, int* fd_out) {
  const Card& c = cards_[peer];
  std::vector<uint32_t> candidates;
  // Same host name: loopback (also the single-machine case); else the peer's
  // own addresses in the order it listed them.
  if (std::strncmp(c.host, cards_[rank_].host, sizeof(c.host)) == 0)
    candidates.push_back(htonl(INADDR_LOOPBACK));
  for (int i = 0; i < c.naddrs && i < 8; ++i) candidates.push_back(c.addrs[i]);
  std::string tried;
  for (uint32_t a : candidates) {
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (fd < 0) return Status::Unavailable(std::string("socket: ") + std::strerror(errno));
    sockaddr_in sa{};
    sa.sin_family = AF_INET;
    sa.sin_port = htons(static_cast<uint16_t>(c.port));
    sa.sin_addr.s_addr = a;
    char text[INET_ADDRSTRLEN] = "?";
    inet_ntop(AF_INET, &sa.sin_addr, text, sizeof(text));
    tried += std::string(tried.empty() ? "" : ", ") + text;
    int rc = connect(fd, reinterpret_cast<sockaddr*>(&sa), sizeof(sa));
    if (rc != 0 && errno == EINPROGRESS && WaitFd(fd, POLLOUT, 3.0)) {
      int err = 0;
      socklen_t len = sizeof(err);
      getsockopt(fd, SOL_SOCKET, SO_ERROR, &err, &len);
      rc = err == 0 ? 0 : -1;
    }
    if (rc == 0) {
      const int32_t me = rank_;
      if (send(fd, &me, sizeof(me), MSG_NOSIGNAL) == sizeof(me)) {
        *fd_out = fd;
        return Status::Ok();
      }
    }
    close(fd);
  }
  return Status::Unavailable("cannot connect to rank " + std::to_string(peer) + " on " + c.host +
                             " (tried " + tried + " port " + std::to_string(c.port) + ")");
}

Status PeerWatchdog::AcceptFrom(int listen_fd, const std::vector<int>& peers) {
  const double end = Now() + 10.0;
  size_t missing = peers.size();
  while (missing > 0 && Now() < end) {
    if (!WaitFd(listen_fd, POLLIN, end - Now())) break;
    int fd = accept4(listen_fd, nullptr, nullptr, SOCK_NONBLOCK | SOCK_CLOEXEC);
    if (fd < 0) continue;
    int32_t who = -1;
    Link* link = nullptr;
    if (WaitFd(fd, POLLIN, 3.0) && recv(fd, &who, sizeof(who), MSG_WAITALL) == sizeof(who) &&
        std::find(peers.begin(), peers.end(), who) != peers.end()) {
      for (Link& l : links_)
        if (l.peer == who && l.fd < 0) link = &l;
    }
    if (link == nullptr) {
      close(fd);  // not one of ours, or a duplicate: ignore
      continue;
    }
    link->fd = fd;
    --missing;
  }
  if (missing == 0) return Status::Ok();
  std::string who;
  for (const Link& l : links_)
    if (l.fd < 0)
      who += std::string(who.empty() ? "" : ", ") + std::to_string(l.peer) + " on " +
             cards_[l.peer].host;
  return Status::Unavailable("no connection from rank " + who + " within 10 s");
}

std::unique_ptr<PeerWatchdog> PeerWatchdog::Start(const Communicator& comm, Topology topology,
                                                  double timeout, OnLost on_lost,
                                                  const std::string& tag) {
  std::unique_ptr<PeerWatchdog> w(new PeerWatchdog());
  w->rank_ = comm.rank();
  w->size_ = comm.size();
  w->timeout_ = timeout;
  w->tag_ = tag;
  w->on_lost_ = std::move(on_lost);
  Card mine;
  int len = 0;
  MPI_Get_processor_name(mine.host, &len);
  mine.pid = static_cast<int32_t>(getpid());
  Status local;
  int listen_fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
  sockaddr_in sa{};
  sa.sin_family = AF_INET;
  sa.sin_addr.s_addr = htonl(INADDR_ANY);
  socklen_t sl = sizeof(sa);
  if (listen_fd < 0 || bind(listen_fd, reinterpret_cast<sockaddr*>(&sa), sizeof(sa)) != 0 ||
      listen(listen_fd, SOMAXCONN) != 0 ||
      getsockname(listen_fd, reinterpret_cast<sockaddr*>(&sa), &sl) != 0) {
    local = Status::Unavailable(std::string("listen: ") + std::strerror(errno));
  } else {
    mine.port = ntohs(sa.sin_port);
  }
  ifaddrs* ifs = nullptr;
  if (getifaddrs(&ifs) == 0) {
    for (ifaddrs* i = ifs; i && mine.naddrs < 8; i = i->ifa_next) {
      if (!i->ifa_addr || i->ifa_addr->sa_family != AF_INET || (i->ifa_flags & IFF_LOOPBACK) ||
          !(i->ifa_flags & IFF_UP))
        continue;
      mine.addrs[mine.naddrs++] = reinterpret_cast<sockaddr_in*>(i->ifa_addr)->sin_addr.s_addr;
    }
    freeifaddrs(ifs);
  }
  w->cards_.resize(w->size_);
  Status gathered = comm.Allgather(&mine, sizeof(Card), w->cards_.data());
  if (!gathered.ok()) local = gathered;
  // Higher ranks connect to lower ones (the listener's backlog holds the
  // connection until the lower rank accepts), then each rank accepts from
  // its higher peers.
  std::vector<int> accept_from;
  for (int peer : Peers(topology, w->rank_, w->size_)) {
    Link link;
    link.peer = peer;
    w->links_.push_back(link);
    if (peer > w->rank_) accept_from.push_back(peer);
  }
  for (Link& l : w->links_)
    if (local.ok() && l.peer < w->rank_) local = w->Connect(l.peer, &l.fd);
  if (local.ok() && !accept_from.empty()) local = w->AcceptFrom(listen_fd, accept_from);
  if (listen_fd >= 0) close(listen_fd);
  Status agreed = comm.AgreeOnStatus(
      local.ok() ? local
                 : Status::Unavailable("rank " + std::to_string(w->rank_) + " on " + mine.host +
                                       ": " + local.message()));
  if (!agreed.ok() || pipe2(w->wake_, O_CLOEXEC) != 0) {
    if (comm.rank() == 0)
      LogWarn("{} warning: peer watchdog off ({}); a frozen rank will hang", tag, agreed.message());
    for (Link& l : w->links_)
      if (l.fd >= 0) close(l.fd), l.fd = -1;
    w->links_.clear();
    return nullptr;
  }
  for (Link& l : w->links_) l.last_heard = Now();
  w->thread_ = std::thread([p = w.get()] { p->Run(); });
  return w;
}

void PeerWatchdog::Run() {
  const double interval = std::clamp(timeout_ / 10.0, 0.05, 1.0);
  double next_beat = 0;
  char buf[256];
  double last_loop = Now();
  std::vector<pollfd> fds(links_.size() + 1);
  while (!stop_.load()) {
    const double now = Now();
    if (now - last_loop > std::max(2.0, timeout_ / 2)) {
      // This thread did not run for a long time: the whole process was
      // stopped (SIGSTOP, a frozen host). Say so, since its peers will now
      // report it lost, and do not count the gap against them.
      LogWarn("{} rank {} on {}: this rank was stopped for {:.1f} s", tag_, rank_,
              cards_[rank_].host, now - last_loop);
      for (Link& l : links_) l.last_heard = now;
    }
    last_loop = now;
    if (now >= next_beat) {
      const char beat = 'h';
      for (Link& l : links_)
        if (!l.said_bye)
          (void)!send(l.fd, &beat, 1,
                      MSG_NOSIGNAL | MSG_DONTWAIT);  // a full buffer just skips a beat
      next_beat = now + interval;
    }
    for (size_t i = 0; i < links_.size(); ++i)
      fds[i] = {links_[i].said_bye ? -1 : links_[i].fd, POLLIN, 0};
    fds[links_.size()] = {wake_[0], POLLIN, 0};
    const int n =
        poll(fds.data(), fds.size(), static_cast<int>(std::max(0.0, next_beat - Now()) * 1000) + 1);
    if (stop_.load()) break;
    if (n < 0 && errno != EINTR) break;
    for (size_t i = 0; i < links_.size(); ++i) {
      Link& l = links_[i];
      if (l.said_bye) continue;
      std::string why;
      if (fds[i].revents & (POLLIN | POLLHUP | POLLERR)) {
        const ssize_t got = recv(l.fd, buf, sizeof(buf), MSG_DONTWAIT);
        if (got > 0) {
          l.last_heard = Now();
          if (std::memchr(buf, 'b', static_cast<size_t>(got))) l.said_bye = true;
        } else if (got == 0 || (errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR)) {
          why = got == 0 ? "its connection closed without a goodbye: the process or its host died"
                         : std::string("its connection failed (") + std::strerror(errno) + ")";
        }
      }
      if (why.empty() && !l.said_bye && Now() - l.last_heard > timeout_) {
        char text[160];
        std::snprintf(
            text, sizeof(text),
            "no heartbeat for %.1f s (peer timeout %g s): frozen, or its host or link is down",
            Now() - l.last_heard, timeout_);
        why = text;
      }
      if (!why.empty()) {
        const Card& peer = cards_[l.peer];
        on_lost_(PeerLoss{l.peer, peer.host, peer.pid, why});
        return;  // one report: the caller ends the world
      }
    }
  }
}

void PeerWatchdog::Stop(bool goodbye) {
  if (thread_.joinable()) {
    stop_.store(true);
    const char c = 'x';
    (void)!write(wake_[1], &c, 1);
    thread_.join();
  }
  const char bye = 'b';
  char drain[256];
  for (Link& l : links_) {
    if (l.fd < 0) continue;
    if (goodbye) {
      // Read what is queued first: closing with unread bytes would send a
      // reset instead of the goodbye.
      while (recv(l.fd, drain, sizeof(drain), MSG_DONTWAIT) > 0) {
      }
      (void)!send(l.fd, &bye, 1, MSG_NOSIGNAL | MSG_DONTWAIT);
      shutdown(l.fd, SHUT_WR);
    }
    close(l.fd);
    l.fd = -1;
  }
  for (int& fd : wake_)
    if (fd >= 0) close(fd), fd = -1;
}

}  // namespace ringtree
