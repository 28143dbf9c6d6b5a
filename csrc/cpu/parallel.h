// Work spreading for the CPU kernels: chunks claimed dynamically, and a caller that never waits for
// a thread that has not started.
//
// at::parallel_for (OpenMP) splits the work statically and joins every thread at a barrier, so a
// call lasts until each thread of the team has been scheduled and finished its share: on a
// machine shared with other busy processes one descheduled thread stalls the call for a whole
// scheduler time slice (several milliseconds for a 0.2 ms GEMV). Here the calling thread and up to
// threads - 1 pool workers claim chunks from an atomic counter; the caller takes every chunk
// nobody has claimed and then waits only for chunks already running. On an idle machine this
// spreads the work as evenly as a static split; on a busy one it degrades to fewer threads instead
// of to a time slice.
#pragma once

#include <cstdint>
#include <functional>

namespace qframe {
namespace cpu {

// Runs body(begin, end) for consecutive ranges of at most `chunk` items covering [0, n), on the
// calling thread and up to `threads - 1` workers of a process-wide pool (started on first use).
// body must not throw; ranges may run in any order and concurrently.
void parallel_chunks(int64_t n, int64_t chunk, int threads, const std::function<void(int64_t, int64_t)>& body);

}  // namespace cpu
}  // namespace qframe
