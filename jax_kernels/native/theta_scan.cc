// CPU kernels of the theta layer's event scan (jax_kernels.models.theta), through XLA's FFI.
//
// The same arithmetic as the pure-JAX scan (`_rotate_spike_kick` and `_rotation_scan_bwd`),
// with the loops in the order the CPU wants: sample by sample, the events of one sample in a
// row, its neurons innermost. One sample's state (`2 N` floats) stays in the L1 cache for all of
// its events, where XLA's scan makes about ten passes over the whole batch's `[B, N]` arrays per
// event. Samples are independent; blocks of them run on XLA's intra-op thread pool.
//
// Layouts (row-major, as JAX passes them): state [2, B, N]; cos_step, sin_step, applied, index
// [S, B]; kick table [R, N] with index (gathered rows) or [S, B, N] (dense, no index); records
// [K, B, N]. A record slot without a spike has interval S and zero reset state.

#include <algorithm>
#include <atomic>
#include <cmath>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <functional>
#include <limits>
#include <memory>
#include <mutex>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

// Runs body(first, last) over [0, n) in blocks, on the pool and on the calling thread. The caller
// waits for the blocks to be done, not for pool tasks to start: a task that starts late (e.g. the
// pool's only thread is the caller) finds nothing left and returns.
void ParallelFor(ffi::ThreadPool& pool, int64_t n, int64_t block,
                 const std::function<void(int64_t, int64_t)>& body) {
  struct Shared {
    std::atomic<int64_t> next{0};
    std::atomic<int64_t> done{0};
    std::mutex mutex;
    std::condition_variable finished;
  };
  const int64_t n_blocks = (n + block - 1) / block;
  if (n_blocks <= 1) {
    body(0, n);
    return;
  }
  auto shared = std::make_shared<Shared>();
  // body lives on the caller's stack; tasks only touch it while blocks remain, and the caller
  // does not return before every block is done.
  auto work = [shared, n, block, n_blocks, &body]() {
    for (;;) {
      const int64_t b = shared->next.fetch_add(1);
      if (b >= n_blocks) return;
      body(b * block, std::min(n, (b + 1) * block));
      if (shared->done.fetch_add(1) + 1 == n_blocks) {
        std::lock_guard<std::mutex> lock(shared->mutex);
        shared->finished.notify_all();
      }
    }
  };
  const int64_t helpers = std::min<int64_t>(pool.num_threads(), n_blocks - 1);
  for (int64_t i = 0; i < helpers; ++i) {
    auto task = work;
    pool.Schedule(std::move(task));
  }
  work();
  std::unique_lock<std::mutex> lock(shared->mutex);
  shared->finished.wait(lock, [&] { return shared->done.load() == n_blocks; });
}

int64_t BlockSize(int64_t batch, int64_t threads) {
  // A few blocks per thread balance uneven samples; at least one sample each.
  return std::max<int64_t>(1, batch / std::max<int64_t>(1, 4 * threads));
}

// One neuron's event, the arithmetic shared by the forward pass and the reverse pass's
// recomputation: rotate by (cs, sn), reset past the spike (z -> -z), kick by u.
template <typename T>
struct NeuronEvent {
  T sign, reset_cos, reset_sin, u, inverse_norm, cos_out, sin_out;
  bool spike;

  inline NeuronEvent(T cos, T sin, T cs, T sn, T kick, T scale) {
    const T rotated_cos = cos * cs - sin * sn;
    const T rotated_sin = sin * cs + cos * sn;
    spike = (rotated_sin < T(0)) | ((rotated_sin == T(0)) & (rotated_cos < T(0)));
    sign = spike ? T(-1) : T(1);
    reset_cos = sign * rotated_cos;
    reset_sin = sign * rotated_sin;
    u = kick * scale;
    const T shifted = reset_cos - u * reset_sin;
    inverse_norm = T(1) / std::sqrt(shifted * shifted + reset_sin * reset_sin);
    cos_out = shifted * inverse_norm;
    sin_out = reset_sin * inverse_norm;
  }
};

// One event for the neurons of one sample (NeuronEvent, kick u = scale * row). Writes the state
// after the event, and the state after the reset (before the kick) and the spike flag for the
// records.
template <typename T>
inline void Event(int64_t n_neurons, T* cos, T* sin, T cs, T sn, const T* row, T scale,
                  T* reset_cos, T* reset_sin, uint8_t* spiked) {
  for (int64_t n = 0; n < n_neurons; ++n) {
    const NeuronEvent<T> event(cos[n], sin[n], cs, sn, row[n], scale);
    cos[n] = event.cos_out;
    sin[n] = event.sin_out;
    reset_cos[n] = event.reset_cos;
    reset_sin[n] = event.reset_sin;
    spiked[n] = event.spike;
  }
}

// The reverse of Event for the neurons of one sample: from the cotangents of the state after
// the event (grad_cos, grad_sin; overwritten with those of the state before it) and of the spike
// records made at this event (record_event == event), the cotangents of the kick (grad_kick) and
// the terms of the rotation angle's cotangent (angle_terms, summed by the caller). The event is
// recomputed from the state before it. Returns whether a record was made at this event.
template <typename T>
inline int ReverseEvent(int64_t n_neurons, const T* cos_before, const T* sin_before, T c_step,
                        T s_step, const T* row, T scale, T event,
                        const T* record_event, const T* record_grad_cos,
                        const T* record_grad_sin, T* grad_cos, T* grad_sin, T* grad_kick,
                        T* angle_terms) {
  int any_recorded = 0;
  for (int64_t n = 0; n < n_neurons; ++n) {
    const NeuronEvent<T> forward(cos_before[n], sin_before[n], c_step, s_step, row[n], scale);
    const T sign = forward.sign, reset_cos = forward.reset_cos, reset_sin = forward.reset_sin;
    const T u = forward.u, inverse_norm = forward.inverse_norm;
    const T cos_out = forward.cos_out, sin_out = forward.sin_out;
    // Normalisation: d(out)/d(shifted, reset_sin) is r (sin_out, -cos_out) (sin_out, -cos_out)^T.
    const T q = inverse_norm * (grad_cos[n] * sin_out - grad_sin[n] * cos_out);
    const T grad_shifted = q * sin_out;
    const bool recorded = record_event[n] == event;
    const T pending_cos = record_grad_cos[n], pending_sin = record_grad_sin[n];
    const T grad_reset_cos = grad_shifted + (recorded ? pending_cos : T(0));
    const T grad_reset_sin = -q * cos_out - u * grad_shifted + (recorded ? pending_sin : T(0));
    any_recorded |= int(recorded);
    grad_kick[n] = -reset_sin * grad_shifted * scale;
    // d(rotated)/d(angle) = (-rotated_sin, rotated_cos); the reset's sign cancels.
    angle_terms[n] = grad_reset_sin * reset_cos - grad_reset_cos * reset_sin;
    const T grad_rotated_cos = sign * grad_reset_cos, grad_rotated_sin = sign * grad_reset_sin;
    grad_cos[n] = grad_rotated_cos * c_step + grad_rotated_sin * s_step;
    grad_sin[n] = grad_rotated_sin * c_step - grad_rotated_cos * s_step;
  }
  return any_recorded;
}

template <typename T>
struct Kicks {
  const T* table;
  const int32_t* index;  // nullptr: dense [S, B, N]
  const bool* applied;
  int64_t batch, n_neurons;
  T inverse_root;
  std::vector<T> zeros;  // the row of an event outside the trial

  const T* Row(int64_t e, int64_t b) const {
    if (!applied[e * batch + b]) return zeros.data();
    return index ? table + int64_t(index[e * batch + b]) * n_neurons
                 : table + (e * batch + b) * n_neurons;
  }
};

template <ffi::DataType D>
ffi::Error Forward(ffi::ThreadPool pool, ffi::Buffer<D> state, ffi::Buffer<D> cos_step,
                   ffi::Buffer<D> sin_step, ffi::Buffer<ffi::PRED> applied,
                   ffi::Buffer<D> table, ffi::Buffer<ffi::S32> index,
                   ffi::ResultBuffer<D> final_state, ffi::ResultBuffer<ffi::S32> count,
                   ffi::ResultBuffer<ffi::S32> interval, ffi::ResultBuffer<D> record_cos,
                   ffi::ResultBuffer<D> record_sin, bool gathered, double inverse_root) {
  using T = ffi::NativeType<D>;
  const auto state_dims = state.dimensions();
  const int64_t batch = state_dims[1], n_neurons = state_dims[2];
  const int64_t n_events = cos_step.dimensions()[0];
  const int64_t max_spikes = interval->dimensions()[0];
  Kicks<T> kicks{table.typed_data(), gathered ? index.typed_data() : nullptr,
                 applied.typed_data(), batch, n_neurons, T(inverse_root),
                 std::vector<T>(n_neurons, T(0))};
  const T* cs = cos_step.typed_data();
  const T* sn = sin_step.typed_data();
  const T* state_in = state.typed_data();
  T* state_out = final_state->typed_data();
  int32_t* counts = count->typed_data();
  int32_t* intervals = interval->typed_data();
  T* records_cos = record_cos->typed_data();
  T* records_sin = record_sin->typed_data();
  const int64_t plane = batch * n_neurons;

  ParallelFor(pool, batch, BlockSize(batch, pool.num_threads()), [&](int64_t first, int64_t last) {
    std::vector<T> cos(n_neurons), sin(n_neurons), rc(n_neurons), rs(n_neurons);
    std::vector<uint8_t> spiked(n_neurons);
    for (int64_t b = first; b < last; ++b) {
      std::memcpy(cos.data(), state_in + b * n_neurons, n_neurons * sizeof(T));
      std::memcpy(sin.data(), state_in + plane + b * n_neurons, n_neurons * sizeof(T));
      int32_t* c = counts + b * n_neurons;
      std::fill(c, c + n_neurons, 0);
      for (int64_t k = 0; k < max_spikes; ++k) {
        std::fill(intervals + k * plane + b * n_neurons,
                  intervals + k * plane + (b + 1) * n_neurons, int32_t(n_events));
        std::fill(records_cos + k * plane + b * n_neurons,
                  records_cos + k * plane + (b + 1) * n_neurons, T(0));
        std::fill(records_sin + k * plane + b * n_neurons,
                  records_sin + k * plane + (b + 1) * n_neurons, T(0));
      }
      for (int64_t e = 0; e < n_events; ++e) {
        Event<T>(n_neurons, cos.data(), sin.data(), cs[e * batch + b], sn[e * batch + b],
                 kicks.Row(e, b), kicks.inverse_root, rc.data(), rs.data(), spiked.data());
        // Spikes are rare: record them in a second, scalar pass.
        for (int64_t n = 0; n < n_neurons; ++n) {
          if (!spiked[n]) continue;
          const int64_t k = c[n]++;
          if (k >= max_spikes) continue;
          const int64_t at = k * plane + b * n_neurons + n;
          intervals[at] = int32_t(e);
          records_cos[at] = rc[n];
          records_sin[at] = rs[n];
        }
      }
      std::memcpy(state_out + b * n_neurons, cos.data(), n_neurons * sizeof(T));
      std::memcpy(state_out + plane + b * n_neurons, sin.data(), n_neurons * sizeof(T));
    }
  });
  return ffi::Error::Success();
}

template <ffi::DataType D>
ffi::Error Backward(ffi::ThreadPool pool, ffi::Buffer<D> state, ffi::Buffer<D> cos_step,
                    ffi::Buffer<D> sin_step, ffi::Buffer<ffi::PRED> applied,
                    ffi::Buffer<D> table, ffi::Buffer<ffi::S32> index,
                    ffi::Buffer<ffi::S32> interval, ffi::Buffer<D> grad_final,
                    ffi::Buffer<D> grad_record_cos, ffi::Buffer<D> grad_record_sin,
                    ffi::ResultBuffer<D> grad_state, ffi::ResultBuffer<D> grad_angle,
                    ffi::ResultBuffer<D> grad_table, bool gathered, double inverse_root) {
  using T = ffi::NativeType<D>;
  const auto state_dims = state.dimensions();
  const int64_t batch = state_dims[1], n_neurons = state_dims[2];
  const int64_t n_events = cos_step.dimensions()[0];
  const int64_t max_spikes = interval.dimensions()[0];
  const int64_t n_rows = gathered ? table.dimensions()[0] : 0;
  Kicks<T> kicks{table.typed_data(), gathered ? index.typed_data() : nullptr,
                 applied.typed_data(), batch, n_neurons, T(inverse_root),
                 std::vector<T>(n_neurons, T(0))};
  const T* cs = cos_step.typed_data();
  const T* sn = sin_step.typed_data();
  const bool* is_applied = applied.typed_data();
  const int32_t* intervals = interval.typed_data();
  const T* grad_cos_k = grad_record_cos.typed_data();
  const T* grad_sin_k = grad_record_sin.typed_data();
  T* grad_angles = grad_angle->typed_data();
  T* grad_rows = grad_table->typed_data();
  const int64_t plane = batch * n_neurons;
  const T scale = T(inverse_root);
  // Gathered rows: every block adds into its own table, summed at the end.
  std::mutex table_mutex;
  if (gathered) std::fill(grad_rows, grad_rows + n_rows * n_neurons, T(0));

  ParallelFor(pool, batch, BlockSize(batch, pool.num_threads()), [&](int64_t first, int64_t last) {
    // The state before each event of one sample, recomputed: [S, 2, N].
    std::vector<T> states(n_events * 2 * n_neurons);
    std::vector<T> cos(n_neurons), sin(n_neurons), rc(n_neurons), rs(n_neurons);
    std::vector<T> grad_cos(n_neurons), grad_sin(n_neurons), grad_kick(n_neurons);
    std::vector<T> angle_terms(n_neurons);
    std::vector<uint8_t> spiked(n_neurons);
    std::vector<int64_t> next_record(n_neurons);
    // Event indices as floats (exact below 2^24): a float compare lets the compiler vectorise
    // the selects of the neuron loop (an integer one did not).
    std::vector<T> record_event(n_neurons);
    std::vector<T> record_grad_cos(n_neurons), record_grad_sin(n_neurons);
    std::vector<T> block_table(gathered ? n_rows * n_neurons : 0, T(0));
    for (int64_t b = first; b < last; ++b) {
      std::memcpy(cos.data(), state.typed_data() + b * n_neurons, n_neurons * sizeof(T));
      std::memcpy(sin.data(), state.typed_data() + plane + b * n_neurons, n_neurons * sizeof(T));
      for (int64_t e = 0; e < n_events; ++e) {
        std::memcpy(&states[(2 * e) * n_neurons], cos.data(), n_neurons * sizeof(T));
        std::memcpy(&states[(2 * e + 1) * n_neurons], sin.data(), n_neurons * sizeof(T));
        Event<T>(n_neurons, cos.data(), sin.data(), cs[e * batch + b], sn[e * batch + b],
                 kicks.Row(e, b), scale, rc.data(), rs.data(), spiked.data());
      }
      std::memcpy(grad_cos.data(), grad_final.typed_data() + b * n_neurons, n_neurons * sizeof(T));
      std::memcpy(grad_sin.data(), grad_final.typed_data() + plane + b * n_neurons,
                  n_neurons * sizeof(T));
      // The records of a neuron hold ascending events: visit them last first. The pending one
      // (event, cotangents) sits in flat arrays so that the neuron loop has no branches.
      auto load_record = [&](int64_t n, int64_t k) {
        next_record[n] = k;
        const int64_t at = k * plane + b * n_neurons + n;
        record_event[n] = k >= 0 ? T(intervals[at]) : T(-1);
        record_grad_cos[n] = k >= 0 ? grad_cos_k[at] : T(0);
        record_grad_sin[n] = k >= 0 ? grad_sin_k[at] : T(0);
      };
      for (int64_t n = 0; n < n_neurons; ++n) {
        int64_t k = max_spikes - 1;
        while (k >= 0 && intervals[k * plane + b * n_neurons + n] >= n_events) --k;
        load_record(n, k);
      }
      for (int64_t e = n_events - 1; e >= 0; --e) {
        const T c_step = cs[e * batch + b], s_step = sn[e * batch + b];
        const T* row = kicks.Row(e, b);
        const bool kicked = is_applied[e * batch + b];
        const T* cos_before = &states[(2 * e) * n_neurons];
        const T* sin_before = &states[(2 * e + 1) * n_neurons];
        const int any_recorded = ReverseEvent<T>(
            n_neurons, cos_before, sin_before, c_step, s_step, row, scale, T(e),
            record_event.data(), record_grad_cos.data(), record_grad_sin.data(), grad_cos.data(),
            grad_sin.data(), grad_kick.data(), angle_terms.data());
        // Summed apart from the neuron loop: an ordered float sum inside it would keep the
        // compiler from vectorising the loop.
        T angle = 0;
        for (int64_t n = 0; n < n_neurons; ++n) angle += angle_terms[n];
        grad_angles[e * batch + b] = angle;
        if (any_recorded) {
          for (int64_t n = 0; n < n_neurons; ++n) {
            if (record_event[n] == T(e)) load_record(n, next_record[n] - 1);
          }
        }
        if (gathered) {
          if (kicked) {  // grad_kick is only meaningful for an applied kick
            T* target = &block_table[int64_t(kicks.index[e * batch + b]) * n_neurons];
            for (int64_t n = 0; n < n_neurons; ++n) target[n] += grad_kick[n];
          }
        } else {
          T* target = grad_rows + (e * batch + b) * n_neurons;
          if (kicked) {
            std::memcpy(target, grad_kick.data(), n_neurons * sizeof(T));
          } else {
            std::fill(target, target + n_neurons, T(0));
          }
        }
      }
      std::memcpy(grad_state->typed_data() + b * n_neurons, grad_cos.data(),
                  n_neurons * sizeof(T));
      std::memcpy(grad_state->typed_data() + plane + b * n_neurons, grad_sin.data(),
                  n_neurons * sizeof(T));
    }
    if (gathered) {
      std::lock_guard<std::mutex> lock(table_mutex);
      for (int64_t i = 0; i < n_rows * n_neurons; ++i) grad_rows[i] += block_table[i];
    }
  });
  return ffi::Error::Success();
}

// The inputs both kernels take: state, cos_step, sin_step, applied, kick table, index.
#define SCAN_INPUTS(D)                                   \
  ffi::Ffi::Bind()                                       \
      .Ctx<ffi::ThreadPool>()                            \
      .Arg<ffi::Buffer<D>>()                             \
      .Arg<ffi::Buffer<D>>()                             \
      .Arg<ffi::Buffer<D>>()                             \
      .Arg<ffi::Buffer<ffi::PRED>>()                     \
      .Arg<ffi::Buffer<D>>()                             \
      .Arg<ffi::Buffer<ffi::S32>>()

#define SCAN_ATTRIBUTES .Attr<bool>("gathered").Attr<double>("inverse_root")

// Returns: final state, counts, record events, record cos, record sin.
#define FORWARD_BINDING(D)                               \
  SCAN_INPUTS(D)                                         \
      .Ret<ffi::Buffer<D>>()                             \
      .Ret<ffi::Buffer<ffi::S32>>()                      \
      .Ret<ffi::Buffer<ffi::S32>>()                      \
      .Ret<ffi::Buffer<D>>()                             \
      .Ret<ffi::Buffer<D>>() SCAN_ATTRIBUTES

// Also takes: record events and the cotangents of the final state and of the records; returns
// the cotangents of the state, the angle steps and the kick table.
#define BACKWARD_BINDING(D)                              \
  SCAN_INPUTS(D)                                         \
      .Arg<ffi::Buffer<ffi::S32>>()                      \
      .Arg<ffi::Buffer<D>>()                             \
      .Arg<ffi::Buffer<D>>()                             \
      .Arg<ffi::Buffer<D>>()                             \
      .Ret<ffi::Buffer<D>>()                             \
      .Ret<ffi::Buffer<D>>()                             \
      .Ret<ffi::Buffer<D>>() SCAN_ATTRIBUTES


// ---- The theta convolutional layer (jax_kernels.conv) ------------------------------------------
//
// The same arithmetic as jax_kernels.conv's pure-JAX event scan, sample by sample: an input
// event at (channel, row, col) touches the C_out k^2 neurons whose receptive field holds it.
// Each neuron is kept in the co-rotating frame (constant between its own kicks). A spike found
// at an event is recorded at once (event index and time), so no per-event outputs are needed.
//
// Layouts: frame [2, B, N]; taps [C_in, C_out k^2] (an event's kicks are the row of its input
// channel); source, in_trial, cos_step, sin_step, times [E, B]; count [B, N]; spike times
// [B, N, K] (+inf where empty).

struct ConvGeometry {
  int64_t in_h, in_w, out_c, out_h, out_w, k, stride, padding;
  int64_t Lanes() const { return out_c * k * k; }
  int64_t Neurons() const { return out_c * out_h * out_w; }
  // Output position reached through kernel tap j from input coordinate i, or -1.
  static int64_t Position(int64_t i, int64_t j, int64_t padding, int64_t stride, int64_t size) {
    const int64_t numerator = i + padding - j;
    if (numerator < 0 || numerator % stride != 0) return -1;
    const int64_t position = numerator / stride;
    return position < size ? position : -1;
  }
  // Calls lane(p, n) for each reached neuron n of an input at `source` (lane p in taps' row).
  template <typename F>
  inline void ForEachLane(int64_t source, F&& lane) const {
    const int64_t row = (source / in_w) % in_h, col = source % in_w;
    for (int64_t jr = 0; jr < k; ++jr) {
      const int64_t out_row = Position(row, jr, padding, stride, out_h);
      if (out_row < 0) continue;
      for (int64_t jc = 0; jc < k; ++jc) {
        const int64_t out_col = Position(col, jc, padding, stride, out_w);
        if (out_col < 0) continue;
        const int64_t position = out_row * out_w + out_col;
        for (int64_t o = 0; o < out_c; ++o) {
          lane((o * k + jr) * k + jc, o * out_h * out_w + position);
        }
      }
    }
  }
};

// One touched neuron at one event: NeuronEvent (rotation to the event, reset past a spike, kick)
// followed by the rotation back into the co-rotating frame.
template <typename T>
struct ConvLane {
  NeuronEvent<T> event;
  T cos_frame, sin_frame;

  inline ConvLane(T cos, T sin, T cs, T sn, T tap, T scale)
      : event(cos, sin, cs, sn, tap, scale) {
    cos_frame = event.cos_out * cs + event.sin_out * sn;
    sin_frame = event.sin_out * cs - event.cos_out * sn;
  }
};

// The inputs both conv kernels take, and the forward event loop of one sample that the forward
// pass runs and the reverse pass recomputes.
template <typename T>
struct ConvEvents {
  ConvGeometry g;
  int64_t batch, n_neurons, n_events, lanes, channel_size;
  T scale, speed;
  const T* frame;  // [2, B, N]
  const T* tap_rows;
  const int32_t* sources;
  const bool* trial;
  const T *cs, *sn, *t;

  // Offset of event `at`'s row of kicks (its input channel's) in the [C_in, P] taps.
  int64_t RowOffset(int64_t at) const { return (sources[at] / channel_size) * lanes; }

  // Loads sample b's frame into cos/sin and runs its events in time order; after each touched
  // lane calls visit(e, p, n, cos_before, sin_before, lane) with the lane's result.
  template <typename F>
  void Run(int64_t b, T* cos, T* sin, F&& visit) const {
    std::memcpy(cos, frame + b * n_neurons, n_neurons * sizeof(T));
    std::memcpy(sin, frame + batch * n_neurons + b * n_neurons, n_neurons * sizeof(T));
    for (int64_t e = 0; e < n_events; ++e) {
      const int64_t at = e * batch + b;
      if (!trial[at]) continue;
      const T c = cs[at], s = sn[at];
      const T* row = tap_rows + RowOffset(at);
      g.ForEachLane(sources[at], [&](int64_t p, int64_t n) {
        const T cos_before = cos[n], sin_before = sin[n];
        const ConvLane<T> lane(cos_before, sin_before, c, s, row[p], scale);
        cos[n] = lane.cos_frame;
        sin[n] = lane.sin_frame;
        visit(e, p, n, cos_before, sin_before, lane);
      });
    }
  }
};

template <ffi::DataType D>
ConvEvents<ffi::NativeType<D>> MakeConvEvents(
    ffi::Buffer<D>& frame, ffi::Buffer<D>& taps, ffi::Buffer<ffi::S32>& source,
    ffi::Buffer<ffi::PRED>& in_trial, ffi::Buffer<D>& cos_step, ffi::Buffer<D>& sin_step,
    ffi::Buffer<D>& times, int64_t in_h, int64_t in_w, int64_t out_c, int64_t out_h,
    int64_t out_w, int64_t kernel_size, int64_t stride, int64_t padding, double inverse_root,
    double angular_speed) {
  using T = ffi::NativeType<D>;
  const ConvGeometry g{in_h, in_w, out_c, out_h, out_w, kernel_size, stride, padding};
  return ConvEvents<T>{g, frame.dimensions()[1], frame.dimensions()[2],
                       source.dimensions()[0], g.Lanes(), in_h * in_w, T(inverse_root),
                       T(angular_speed), frame.typed_data(), taps.typed_data(),
                       source.typed_data(), in_trial.typed_data(), cos_step.typed_data(),
                       sin_step.typed_data(), times.typed_data()};
}

template <ffi::DataType D>
ffi::Error ConvForward(ffi::ThreadPool pool, ffi::Buffer<D> frame, ffi::Buffer<D> taps,
                       ffi::Buffer<ffi::S32> source, ffi::Buffer<ffi::PRED> in_trial,
                       ffi::Buffer<D> cos_step, ffi::Buffer<D> sin_step, ffi::Buffer<D> times,
                       ffi::ResultBuffer<D> final_frame, ffi::ResultBuffer<ffi::S32> count,
                       ffi::ResultBuffer<D> record_time, int64_t in_h, int64_t in_w,
                       int64_t out_c, int64_t out_h, int64_t out_w, int64_t kernel_size,
                       int64_t stride, int64_t padding, double inverse_root,
                       double angular_speed) {
  using T = ffi::NativeType<D>;
  const ConvEvents<T> events = MakeConvEvents<D>(
      frame, taps, source, in_trial, cos_step, sin_step, times, in_h, in_w, out_c, out_h, out_w,
      kernel_size, stride, padding, inverse_root, angular_speed);
  const int64_t batch = events.batch, n_neurons = events.n_neurons;
  const int64_t max_spikes = record_time->dimensions()[2];

  ParallelFor(pool, batch, BlockSize(batch, pool.num_threads()), [&](int64_t first, int64_t last) {
    std::vector<T> cos(n_neurons), sin(n_neurons);
    for (int64_t b = first; b < last; ++b) {
      int32_t* counts = count->typed_data() + b * n_neurons;
      T* spike_times = record_time->typed_data() + b * n_neurons * max_spikes;
      std::fill(counts, counts + n_neurons, 0);
      std::fill(spike_times, spike_times + n_neurons * max_spikes,
                std::numeric_limits<T>::infinity());
      events.Run(b, cos.data(), sin.data(),
                 [&](int64_t e, int64_t, int64_t n, T, T, const ConvLane<T>& lane) {
        if (!lane.event.spike) return;
        const int64_t slot = counts[n]++;
        if (slot >= max_spikes) return;
        // After the reset the point's angle is the time since the spike.
        const T angle = std::atan2(lane.event.reset_sin, lane.event.reset_cos);
        spike_times[n * max_spikes + slot] =
            std::max(events.t[e * batch + b] - angle / events.speed, T(0));
      });
      std::memcpy(final_frame->typed_data() + b * n_neurons, cos.data(), n_neurons * sizeof(T));
      std::memcpy(final_frame->typed_data() + (batch + b) * n_neurons, sin.data(),
                  n_neurons * sizeof(T));
    }
  });
  return ffi::Error::Success();
}

template <ffi::DataType D>
ffi::Error ConvBackward(ffi::ThreadPool pool, ffi::Buffer<D> frame, ffi::Buffer<D> taps,
                        ffi::Buffer<ffi::S32> source, ffi::Buffer<ffi::PRED> in_trial,
                        ffi::Buffer<D> cos_step, ffi::Buffer<D> sin_step, ffi::Buffer<D> times,
                        ffi::Buffer<D> grad_final, ffi::Buffer<D> grad_record_time,
                        ffi::ResultBuffer<D> grad_frame, ffi::ResultBuffer<D> grad_taps,
                        ffi::ResultBuffer<D> grad_times, int64_t in_h, int64_t in_w,
                        int64_t out_c, int64_t out_h, int64_t out_w, int64_t kernel_size,
                        int64_t stride, int64_t padding, double inverse_root,
                        double angular_speed) {
  using T = ffi::NativeType<D>;
  const ConvEvents<T> events = MakeConvEvents<D>(
      frame, taps, source, in_trial, cos_step, sin_step, times, in_h, in_w, out_c, out_h, out_w,
      kernel_size, stride, padding, inverse_root, angular_speed);
  const int64_t batch = events.batch, n_neurons = events.n_neurons;
  const int64_t n_events = events.n_events, lanes = events.lanes;
  const int64_t max_spikes = grad_record_time.dimensions()[2];
  const int64_t n_taps = taps.dimensions()[0] * lanes;
  const T scale = events.scale, speed = events.speed;
  T* grad_tap_rows = grad_taps->typed_data();
  std::fill(grad_tap_rows, grad_tap_rows + n_taps, T(0));
  std::mutex taps_mutex;  // every block adds into its own taps, summed at the end

  ParallelFor(pool, batch, BlockSize(batch, pool.num_threads()), [&](int64_t first, int64_t last) {
    std::vector<T> cos(n_neurons), sin(n_neurons), grad_cos(n_neurons), grad_sin(n_neurons);
    std::vector<int32_t> counts(n_neurons);
    // Each event's touched points before it, recomputed: [E, P, 2] (lane p at slot p).
    std::vector<T> before(n_events * lanes * 2);
    std::vector<T> block_taps(n_taps, T(0));
    for (int64_t b = first; b < last; ++b) {
      std::fill(counts.begin(), counts.end(), 0);
      events.Run(b, cos.data(), sin.data(),
                 [&](int64_t e, int64_t p, int64_t n, T cos_before, T sin_before,
                     const ConvLane<T>& lane) {
        before[(e * lanes + p) * 2] = cos_before;
        before[(e * lanes + p) * 2 + 1] = sin_before;
        counts[n] += lane.event.spike;
      });
      std::memcpy(grad_cos.data(), grad_final.typed_data() + b * n_neurons,
                  n_neurons * sizeof(T));
      std::memcpy(grad_sin.data(), grad_final.typed_data() + (batch + b) * n_neurons,
                  n_neurons * sizeof(T));
      const T* grad_spike_times = grad_record_time.typed_data() + b * n_neurons * max_spikes;
      for (int64_t e = n_events - 1; e >= 0; --e) {
        const int64_t at = e * batch + b;
        if (!events.trial[at]) {
          grad_times->typed_data()[at] = T(0);
          continue;
        }
        const T c = events.cs[at], s = events.sn[at], time = events.t[at];
        const T* row = events.tap_rows + events.RowOffset(at);
        T* grad_row = &block_taps[events.RowOffset(at)];
        const T* saved = &before[e * lanes * 2];
        T grad_c = 0, grad_s = 0, grad_time = 0;
        events.g.ForEachLane(events.sources[at], [&](int64_t p, int64_t n) {
          const T cos0 = saved[2 * p], sin0 = saved[2 * p + 1];
          const ConvLane<T> lane(cos0, sin0, c, s, row[p], scale);
          const NeuronEvent<T>& ev = lane.event;
          // Rotation back: frame = R(-a) out.
          const T grad_out_cos = grad_cos[n] * c - grad_sin[n] * s;
          const T grad_out_sin = grad_cos[n] * s + grad_sin[n] * c;
          grad_c += grad_cos[n] * ev.cos_out + grad_sin[n] * ev.sin_out;
          grad_s += grad_cos[n] * ev.sin_out - grad_sin[n] * ev.cos_out;
          // Normalisation: out = (shifted, reset_sin) / r.
          const T radial = grad_out_cos * ev.cos_out + grad_out_sin * ev.sin_out;
          const T grad_shifted = ev.inverse_norm * (grad_out_cos - radial * ev.cos_out);
          T grad_reset_sin = ev.inverse_norm * (grad_out_sin - radial * ev.sin_out);
          // Kick: shifted = reset_cos - u reset_sin.
          T grad_reset_cos = grad_shifted;
          grad_reset_sin -= ev.u * grad_shifted;
          grad_row[p] += -ev.reset_sin * grad_shifted * scale;
          if (ev.spike) {
            // Spikes are found in time order: this one is the neuron's slot counts[n] - 1.
            const int64_t slot = --counts[n];
            if (slot < max_spikes) {
              const T angle = std::atan2(ev.reset_sin, ev.reset_cos);
              const T grad = grad_spike_times[n * max_spikes + slot];
              if (time - angle / speed > T(0) && grad != T(0)) {
                // spike time = t - atan2(reset_sin, reset_cos) / speed
                const T r2 = ev.reset_cos * ev.reset_cos + ev.reset_sin * ev.reset_sin;
                grad_time += grad;
                grad_reset_cos += grad * ev.reset_sin / (speed * r2);
                grad_reset_sin -= grad * ev.reset_cos / (speed * r2);
              }
            }
          }
          const T grad_rotated_cos = ev.sign * grad_reset_cos;
          const T grad_rotated_sin = ev.sign * grad_reset_sin;
          // Rotation to the event: rotated = R(a) before.
          grad_cos[n] = grad_rotated_cos * c + grad_rotated_sin * s;
          grad_sin[n] = -grad_rotated_cos * s + grad_rotated_sin * c;
          grad_c += grad_rotated_cos * cos0 + grad_rotated_sin * sin0;
          grad_s += -grad_rotated_cos * sin0 + grad_rotated_sin * cos0;
        });
        // (c, s) = (cos, sin)(speed t).
        grad_times->typed_data()[at] = grad_time + speed * (grad_s * c - grad_c * s);
      }
      std::memcpy(grad_frame->typed_data() + b * n_neurons, grad_cos.data(),
                  n_neurons * sizeof(T));
      std::memcpy(grad_frame->typed_data() + (batch + b) * n_neurons, grad_sin.data(),
                  n_neurons * sizeof(T));
    }
    std::lock_guard<std::mutex> lock(taps_mutex);
    for (int64_t i = 0; i < n_taps; ++i) grad_tap_rows[i] += block_taps[i];
  });
  return ffi::Error::Success();
}

#define CONV_INPUTS(D)                                   \
  ffi::Ffi::Bind()                                       \
      .Ctx<ffi::ThreadPool>()                            \
      .Arg<ffi::Buffer<D>>()                             \
      .Arg<ffi::Buffer<D>>()                             \
      .Arg<ffi::Buffer<ffi::S32>>()                      \
      .Arg<ffi::Buffer<ffi::PRED>>()                     \
      .Arg<ffi::Buffer<D>>()                             \
      .Arg<ffi::Buffer<D>>()                             \
      .Arg<ffi::Buffer<D>>()

#define CONV_ATTRIBUTES                                                                      \
  .Attr<int64_t>("in_h").Attr<int64_t>("in_w").Attr<int64_t>("out_c").Attr<int64_t>("out_h") \
      .Attr<int64_t>("out_w").Attr<int64_t>("kernel_size").Attr<int64_t>("stride")           \
      .Attr<int64_t>("padding").Attr<double>("inverse_root").Attr<double>("angular_speed")

// Returns: final frame, spike counts, spike times.
#define CONV_FORWARD_BINDING(D)                          \
  CONV_INPUTS(D)                                         \
      .Ret<ffi::Buffer<D>>()                             \
      .Ret<ffi::Buffer<ffi::S32>>()                      \
      .Ret<ffi::Buffer<D>>() CONV_ATTRIBUTES

// Also takes the cotangents of the final frame and of the record times; returns those of the
// initial frame, the taps and the event times.
#define CONV_BACKWARD_BINDING(D)                         \
  CONV_INPUTS(D)                                         \
      .Arg<ffi::Buffer<D>>()                             \
      .Arg<ffi::Buffer<D>>()                             \
      .Ret<ffi::Buffer<D>>()                             \
      .Ret<ffi::Buffer<D>>()                             \
      .Ret<ffi::Buffer<D>>() CONV_ATTRIBUTES

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(ThetaScanForwardF32, Forward<ffi::F32>, FORWARD_BINDING(ffi::F32));
XLA_FFI_DEFINE_HANDLER_SYMBOL(ThetaScanForwardF64, Forward<ffi::F64>, FORWARD_BINDING(ffi::F64));
XLA_FFI_DEFINE_HANDLER_SYMBOL(ThetaScanBackwardF32, Backward<ffi::F32>,
                              BACKWARD_BINDING(ffi::F32));
XLA_FFI_DEFINE_HANDLER_SYMBOL(ThetaScanBackwardF64, Backward<ffi::F64>,
                              BACKWARD_BINDING(ffi::F64));
XLA_FFI_DEFINE_HANDLER_SYMBOL(ThetaConvForwardF32, ConvForward<ffi::F32>,
                              CONV_FORWARD_BINDING(ffi::F32));
XLA_FFI_DEFINE_HANDLER_SYMBOL(ThetaConvForwardF64, ConvForward<ffi::F64>,
                              CONV_FORWARD_BINDING(ffi::F64));
XLA_FFI_DEFINE_HANDLER_SYMBOL(ThetaConvBackwardF32, ConvBackward<ffi::F32>,
                              CONV_BACKWARD_BINDING(ffi::F32));
XLA_FFI_DEFINE_HANDLER_SYMBOL(ThetaConvBackwardF64, ConvBackward<ffi::F64>,
                              CONV_BACKWARD_BINDING(ffi::F64));
