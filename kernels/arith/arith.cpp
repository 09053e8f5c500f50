// EnCodec's arithmetic (range) coder in C++: bit-exact with upstream encodec 0.1.1's
// `ArithmeticCoder` / `ArithmeticDecoder` and `build_stable_quantized_cdf`.
//
// Written from the coder's specification (encodec_fast/ops/arith.py holds the readable Python
// reference; tests compare both with upstream's bytes). A plain CPython extension: no torch, no
// pybind11, so it does not depend on a torch build. Buffers come in through the buffer protocol
// (numpy arrays, bytes); the Python wrappers in encodec_fast/ops/arith.py check dtypes and shapes.
//
// Numbers:
//   CDF:  q_i = floor(p_i / r) * r and ranges r_i = floor(float32(M) * q_i) + min_range, all in
//         IEEE float32 as torch computes them on CPU (true division, no contraction: built with
//         -ffp-contract=off and without -ffast-math), M = 2^B - min_range * N; cdf = cumsum(r_i).
//   Coder: state [low, high] with max_bit + 1 significant bits. Upstream uses Python integers and
//         asserts max_bit <= 61 after each symbol; in between, the range doubling can add up to
//         B + 1 more bits, so the state is 128-bit and nothing here can overflow.
//   Symbol interval inside the current width d: [ceil(lo * d / 2^B), floor(hi * d / 2^B)], exact
//         in integers (upstream's doubles are exact there too).
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

namespace {

typedef unsigned __int128 u128;

constexpr int kMaxBit = 61;       // upstream's bound on pending bits after a symbol
constexpr int kMaxRangeBits = 30;  // upstream asserts total_range_bits <= 30
const char* kCdfTooLarge =
    "the quantized CDF exceeds 2**total_range_bits at this symbol (the probabilities sum past 1): no decoder "
    "could read the stream back (upstream's coder fails here or writes such a stream); refusing";

// ---------------------------------------------------------------------------------------------
// CDF construction

struct CdfParams {
    int range_bits;
    float roundoff;   // 0: no rounding step
    int64_t min_range;
};

// float32(M), M = 2^B - min_range * n (upstream computes it in doubles, then torch rounds it).
inline float range_scale(const CdfParams& prm, int64_t n) {
    const double total = std::ldexp(1.0, prm.range_bits);
    return static_cast<float>((1.0 - static_cast<double>(prm.min_range) * n / total) * total);
}

// floor(p / r) * r for p in [0, 1] (truncation is floor there; trunc(x) is exact in float32).
inline float rounded(float p, float r) { return static_cast<float>(static_cast<int32_t>(p / r)) * r; }

// ranges[i] = floor(float32(M) * q_i) + min_range for one pdf row; returns false on a probability
// outside [0, 1] (or NaN). Every value is clamped into [0, 1] before use, so the float -> int
// conversions below are defined whatever the input (all values >= 0 and < 2^31).
// Written so that compilers vectorise it (SSE2 and, where the CPU has it, AVX2); the operations
// and their order are the scalar IEEE ones, so every clone gives the same bits.
#if defined(__GNUC__) && defined(__x86_64__) && !defined(__clang__)
__attribute__((target_clones("avx2", "default")))
#endif
bool row_ranges(const float* pdf, int64_t n, const CdfParams& prm, int32_t* ranges) {
    const float m = range_scale(prm, n);
    const float r = prm.roundoff;
    const int32_t add = static_cast<int32_t>(prm.min_range);
    int32_t bad = 0;
    if (r != 0.0f) {
        for (int64_t i = 0; i < n; ++i) {
            const float p = pdf[i];
            bad |= !((p >= 0.0f) & (p <= 1.0f));
            float pc = p > 0.0f ? p : 0.0f;
            pc = pc < 1.0f ? pc : 1.0f;
            ranges[i] = static_cast<int32_t>(m * rounded(pc, r)) + add;
        }
    } else {
        for (int64_t i = 0; i < n; ++i) {
            const float p = pdf[i];
            bad |= !((p >= 0.0f) & (p <= 1.0f));
            float pc = p > 0.0f ? p : 0.0f;
            pc = pc < 1.0f ? pc : 1.0f;
            ranges[i] = static_cast<int32_t>(m * pc) + add;
        }
    }
    return !bad;
}

// ---------------------------------------------------------------------------------------------
// Bit I/O: bit j of the stream is bit (j % 8) of byte j / 8 (upstream's BitPacker with bits=1).

struct BitWriter {
    std::string bytes;
    uint32_t current = 0;
    int used = 0;
    inline void push(unsigned bit) {
        current |= bit << used;
        if (++used == 8) {
            bytes.push_back(static_cast<char>(current));
            current = 0;
            used = 0;
        }
    }
    void flush() {
        if (used) bytes.push_back(static_cast<char>(current));
        current = 0;
        used = 0;
    }
};

struct BitReader {
    const uint8_t* data = nullptr;
    int64_t size = 0;
    int64_t bit = 0;  // absolute bit position from the start of `data`
    // -1 when the data is exhausted.
    inline int pull() {
        int64_t byte = bit >> 3;
        if (byte >= size) return -1;
        int b = (data[byte] >> (bit & 7)) & 1;
        ++bit;
        return b;
    }
    // Bytes consumed, counted as upstream's unpacker reads them: whole bytes on demand.
    int64_t offset() const { return (bit + 7) >> 3; }
};

// ---------------------------------------------------------------------------------------------
// Coder

// Remove the leading bits that low and high share (they can no longer change); `seen(bit, drop)`
// gets each, most significant first, with the amount removed from the state.
template <typename Seen>
inline void drop_common_prefix(u128& low, u128& high, int& max_bit, Seen seen) {
    while (max_bit >= 0) {
        const u128 bit = low >> max_bit;
        if (bit != (high >> max_bit)) break;
        const u128 drop = bit << max_bit;
        low -= drop;
        high -= drop;
        --max_bit;
        seen(bit, drop);
    }
}

struct Encoder {
    int range_bits;
    u128 low = 0, high = 0;
    int max_bit = -1;
    BitWriter out;

    explicit Encoder(int bits) : range_bits(bits) {}

    // Encode the symbol whose cdf interval is [lo, hi_excl). Returns nullptr or an error text.
    const char* push(uint64_t lo, uint64_t hi_excl) {
        const u128 total = static_cast<u128>(1) << range_bits;
        while (high - low + 1 < total) {
            low <<= 1;
            high = (high << 1) | 1;
            ++max_bit;
        }
        if (hi_excl <= lo) return "empty symbol interval in the CDF";
        // Past 2^B the symbol's interval reaches beyond the current range, and the state leaves
        // the invariant the decoder relies on.
        if (hi_excl > (static_cast<uint64_t>(1) << range_bits)) return kCdfTooLarge;
        const uint64_t d = static_cast<uint64_t>(high - low + 1);  // < 2^(B+1)
        const uint64_t el = (lo * d + (static_cast<uint64_t>(1) << range_bits) - 1) >> range_bits;
        const uint64_t eh = ((hi_excl - 1) * d) >> range_bits;
        if (eh < el) return "symbol interval vanished (CDF gap smaller than its minimum range)";
        high = low + eh;
        low = low + el;
        // A cdf total above 2^B (float32 pdfs that sum past 1) can push high out of the state's
        // bits; upstream's coder stops there with an assertion, so no file can hold this.
        if (high >> (max_bit + 1)) return kCdfTooLarge;
        drop_common_prefix(low, high, max_bit, [this](u128 bit, u128) { out.push(static_cast<unsigned>(bit)); });
        if (max_bit > kMaxBit) return "arithmetic coder overflow (more than 61 pending bits), as upstream";
        return nullptr;
    }

    void finish() {
        for (; max_bit >= 0; --max_bit) out.push(static_cast<unsigned>((low >> max_bit) & 1));
        out.flush();
    }
};

enum PullStatus { kPulled = 0, kExhausted = 1, kCorrupt = 2, kBadCdf = 3 };

struct Decoder {
    int range_bits;
    u128 low = 0, high = 0, current = 0;
    int max_bit = -1;
    BitReader in;

    explicit Decoder(int bits) : range_bits(bits) {}

    // Refill until the width is at least 2^B; false when the stream ends first.
    inline bool refill() {
        const u128 total = static_cast<u128>(1) << range_bits;
        while (high - low + 1 < total) {
            const int b = in.pull();
            if (b < 0) return false;
            low <<= 1;
            high = (high << 1) | 1;
            current = (current << 1) | static_cast<unsigned>(b);
            ++max_bit;
        }
        return true;
    }

    // Decode one symbol. `locate(target, &s, &lo, &hi)` finds the first symbol s whose cdf value
    // cdf[s] is >= target and gives lo = cdf[s-1] (0 for s = 0) and hi = cdf[s]; false if none.
    template <typename Locate>
    PullStatus pull(Locate locate, int64_t* symbol) {
        if (!refill()) return kExhausted;
        if (current < low || current > high) return kCorrupt;
        const uint64_t d = static_cast<uint64_t>(high - low + 1);
        const uint64_t c = static_cast<uint64_t>(current - low);
        // The symbol s has ceil(cdf[s-1] d / 2^B) <= c <= floor((cdf[s] - 1) d / 2^B). The upper
        // bound holds iff cdf[s] >= ceil(c 2^B / d) + 1: the first such s is the only candidate
        // (the intervals are disjoint and increasing), so this finds what upstream's binary
        // search finds, and fails where it fails.
        const uint64_t target = static_cast<uint64_t>(((static_cast<u128>(c) << range_bits) + d - 1) / d) + 1;
        int64_t s;
        uint64_t rl, rh;
        if (!locate(target, &s, &rl, &rh)) return kCorrupt;
        if (rh > (static_cast<uint64_t>(1) << (range_bits + 1)) || rl >= rh) return kBadCdf;
        if (rh > (static_cast<uint64_t>(1) << range_bits)) return kCorrupt;  // the encoder refuses such symbols
        const uint64_t el = (rl * d + (static_cast<uint64_t>(1) << range_bits) - 1) >> range_bits;
        const uint64_t eh = ((rh - 1) * d) >> range_bits;
        if (c < el || c > eh) return kCorrupt;  // in a gap between two symbols' intervals
        high = low + eh;
        low = low + el;
        if (high >> (max_bit + 1)) return kCorrupt;  // the encoder refuses this state
        drop_common_prefix(low, high, max_bit, [this](u128, u128 drop) { current -= drop; });
        if (max_bit > kMaxBit) return kCorrupt;  // no valid encoder state gets here
        *symbol = s;
        return kPulled;
    }
};

// Locate in a given cdf (binary search; values are checked by the caller).
struct InCdf {
    const int64_t* cdf;
    int64_t n;
    bool operator()(uint64_t target, int64_t* s, uint64_t* lo, uint64_t* hi) const {
        int64_t a = 0, b = n;
        while (a < b) {
            const int64_t mid = a + ((b - a) >> 1);
            if (cdf[mid] < 0 || static_cast<uint64_t>(cdf[mid]) < target) a = mid + 1; else b = mid;
        }
        if (a == n) return false;
        *s = a;
        *lo = a ? static_cast<uint64_t>(cdf[a - 1] < 0 ? 0 : cdf[a - 1]) : 0;
        *hi = static_cast<uint64_t>(cdf[a]);
        return true;
    }
};

// Locate in the cumulative sums of a row's ranges (all >= min_range > 0): whole chunks are
// summed (vectorised) and skipped while the total stays below the target, then one by one.
struct InRanges {
    const int32_t* ranges;
    int64_t n;
    bool operator()(uint64_t target, int64_t* s, uint64_t* lo, uint64_t* hi) const {
        constexpr int64_t kChunk = 64;
        uint64_t acc = 0;
        int64_t i = 0;
        for (; i + kChunk <= n; i += kChunk) {
            int64_t sum = 0;
            for (int64_t j = 0; j < kChunk; ++j) sum += ranges[i + j];
            if (acc + static_cast<uint64_t>(sum) >= target) break;
            acc += static_cast<uint64_t>(sum);
        }
        for (; i < n; ++i) {
            const uint64_t next = acc + static_cast<uint64_t>(ranges[i]);
            if (next >= target) {
                *s = i;
                *lo = acc;
                *hi = next;
                return true;
            }
            acc = next;
        }
        return false;
    }
};

// cdf from one pdf row (ranges in scratch).
inline bool row_cdf(const float* pdf, int64_t n, const CdfParams& prm, int32_t* scratch, int64_t* cdf) {
    if (!row_ranges(pdf, n, prm, scratch)) return false;
    int64_t acc = 0;
    for (int64_t i = 0; i < n; ++i) {
        acc += scratch[i];
        cdf[i] = acc;
    }
    return true;
}

// True when every probability lies in [0, 1] (false on NaN).
#if defined(__GNUC__) && defined(__x86_64__) && !defined(__clang__)
__attribute__((target_clones("avx2", "default")))
#endif
bool row_valid(const float* pdf, int64_t n) {
    int32_t bad = 0;
    for (int64_t i = 0; i < n; ++i) bad |= !((pdf[i] >= 0.0f) & (pdf[i] <= 1.0f));
    return !bad;
}

// ranges[0] + ... + ranges[count - 1] of a valid row (row_ranges' arithmetic, summed, not stored).
#if defined(__GNUC__) && defined(__x86_64__) && !defined(__clang__)
__attribute__((target_clones("avx2", "default")))
#endif
int64_t ranges_sum(const float* pdf, int64_t n, int64_t count, const CdfParams& prm) {
    const float m = range_scale(prm, n);
    const float r = prm.roundoff;
    int64_t acc = 0;
    if (r != 0.0f) {
        for (int64_t i = 0; i < count; ++i) acc += static_cast<int32_t>(m * rounded(pdf[i], r));
    } else {
        for (int64_t i = 0; i < count; ++i) acc += static_cast<int32_t>(m * pdf[i]);
    }
    return acc + count * prm.min_range;
}

// [cdf[s-1] (or 0), cdf[s]) of one pdf row without building the cdf: only the ranges up to s.
inline bool row_interval(const float* pdf, int64_t n, int64_t s, const CdfParams& prm, uint64_t* lo, uint64_t* hi) {
    if (!row_valid(pdf, n)) return false;
    const int64_t below = ranges_sum(pdf, n, s, prm);
    *lo = static_cast<uint64_t>(below);
    *hi = static_cast<uint64_t>(below + ranges_sum(pdf + s, n, 1, prm));
    return true;
}

// ---------------------------------------------------------------------------------------------
// Python glue

struct Buffer {
    Py_buffer view{};
    bool held = false;
    ~Buffer() {
        if (held) PyBuffer_Release(&view);
    }
    // kind: 'f' float32, 'q' int64, 'B' bytes.
    bool get(PyObject* obj, char kind, bool writable, const char* name) {
        int flags = PyBUF_C_CONTIGUOUS | PyBUF_FORMAT | (writable ? PyBUF_WRITABLE : 0);
        if (PyObject_GetBuffer(obj, &view, flags) != 0) return false;
        held = true;
        const char* fmt = view.format ? view.format : "B";
        if (*fmt == '<' || *fmt == '=' || *fmt == '@') ++fmt;
        bool ok;
        if (kind == 'f') ok = view.itemsize == 4 && std::strcmp(fmt, "f") == 0;
        else if (kind == 'q') ok = view.itemsize == 8 && (std::strcmp(fmt, "q") == 0 || std::strcmp(fmt, "l") == 0);
        else ok = view.itemsize == 1;
        if (!ok) {
            PyErr_Format(PyExc_TypeError, "%s: expected a contiguous %s buffer", name,
                         kind == 'f' ? "float32" : kind == 'q' ? "int64" : "byte");
            return false;
        }
        return true;
    }
    int64_t count() const { return view.len / view.itemsize; }
    template <typename T> T* ptr() const { return static_cast<T*>(view.buf); }
};

bool check_params(int range_bits, long long min_range, int64_t n, float roundoff) {
    // p / roundoff <= 1 / roundoff must fit the int32 truncation in row_ranges.
    if (roundoff != 0.0f && !(roundoff >= 1e-9f && roundoff <= 1.0f)) {
        PyErr_SetString(PyExc_ValueError, "roundoff must be 0 or in [1e-9, 1] for the C++ coder");
        return false;
    }
    if (range_bits < 1 || range_bits > kMaxRangeBits) {
        PyErr_Format(PyExc_ValueError, "total_range_bits must be in [1, %d], got %d", kMaxRangeBits, range_bits);
        return false;
    }
    if (n < 1) {
        PyErr_SetString(PyExc_ValueError, "the alphabet must have at least one symbol");
        return false;
    }
    if (min_range < 2) {
        PyErr_SetString(PyExc_ValueError, "min_range must be at least 2");
        return false;
    }
    if (static_cast<double>(min_range) * n > std::ldexp(1.0, range_bits)) {
        PyErr_SetString(PyExc_ValueError, "min_range * alphabet size exceeds 2**total_range_bits: reduce min_range");
        return false;
    }
    return true;
}

const char* kBadPdf = "probabilities must lie in [0, 1] (found a value outside, or NaN)";

// build_cdfs(pdfs float32[T*N], out int64[T*N], N, range_bits, roundoff, min_range)
PyObject* py_build_cdfs(PyObject*, PyObject* args) {
    PyObject *pdf_obj, *out_obj;
    long long n, min_range;
    int range_bits;
    float roundoff;
    if (!PyArg_ParseTuple(args, "OOLifL", &pdf_obj, &out_obj, &n, &range_bits, &roundoff, &min_range)) return nullptr;
    if (!check_params(range_bits, min_range, n, roundoff)) return nullptr;
    Buffer pdfs, out;
    if (!pdfs.get(pdf_obj, 'f', false, "pdfs") || !out.get(out_obj, 'q', true, "out")) return nullptr;
    if (pdfs.count() % n != 0 || out.count() != pdfs.count()) {
        PyErr_SetString(PyExc_ValueError, "pdfs must hold T rows of N values and out as many int64");
        return nullptr;
    }
    const int64_t rows = pdfs.count() / n;
    const CdfParams prm{range_bits, roundoff, min_range};
    bool ok = true;
    Py_BEGIN_ALLOW_THREADS
    std::vector<int32_t> scratch(n);
    for (int64_t t = 0; t < rows && ok; ++t)
        ok = row_cdf(pdfs.ptr<float>() + t * n, n, prm, scratch.data(), out.ptr<int64_t>() + t * n);
    Py_END_ALLOW_THREADS
    if (!ok) {
        PyErr_SetString(PyExc_ValueError, kBadPdf);
        return nullptr;
    }
    Py_RETURN_NONE;
}

bool check_symbols(const Buffer& symbols, int64_t rows, int64_t n) {
    if (symbols.count() != rows) {
        PyErr_Format(PyExc_ValueError, "%lld symbols for %lld distributions", (long long)symbols.count(),
                     (long long)rows);
        return false;
    }
    const int64_t* s = symbols.ptr<int64_t>();
    for (int64_t t = 0; t < rows; ++t) {
        if (s[t] < 0 || s[t] >= n) {
            PyErr_Format(PyExc_ValueError, "symbol %lld at position %lld is outside [0, %lld)", (long long)s[t],
                         (long long)t, (long long)n);
            return false;
        }
    }
    return true;
}

// Push one symbol per row of `table` (float32 pdfs [T*N] when from_pdfs, else int64 cdfs [T*N])
// into `enc`.
// Returns false with a Python error set; rows before the failing one stay pushed.
bool push_rows(Encoder& enc, PyObject* table_obj, PyObject* sym_obj, int64_t n, float roundoff, int64_t min_range,
               bool from_pdfs) {
    if (!check_params(enc.range_bits, min_range, n, roundoff)) return false;
    Buffer table, symbols;
    if (!table.get(table_obj, from_pdfs ? 'f' : 'q', false, from_pdfs ? "pdfs" : "cdfs") ||
        !symbols.get(sym_obj, 'q', false, "symbols"))
        return false;
    if (table.count() % n != 0) {
        PyErr_SetString(PyExc_ValueError, "the table must hold T rows of N values");
        return false;
    }
    const int64_t rows = table.count() / n;
    if (!check_symbols(symbols, rows, n)) return false;
    const CdfParams prm{enc.range_bits, roundoff, min_range};
    const char* error = nullptr;
    bool bad_pdf = false;
    Py_BEGIN_ALLOW_THREADS
    const int64_t* sym = symbols.ptr<int64_t>();
    for (int64_t t = 0; t < rows && !error; ++t) {
        uint64_t lo, hi;
        const int64_t s = sym[t];
        if (from_pdfs) {
            if (!row_interval(table.ptr<float>() + t * n, n, s, prm, &lo, &hi)) {
                bad_pdf = true;
                break;
            }
        } else {
            const int64_t* cdf = table.ptr<int64_t>() + t * n;
            lo = s ? static_cast<uint64_t>(cdf[s - 1]) : 0;
            hi = static_cast<uint64_t>(cdf[s]);
            if (cdf[s] < 0 || (s && cdf[s - 1] < 0)) {
                error = "CDF values must lie in [0, 2**total_range_bits]";
                break;
            }
        }
        error = enc.push(lo, hi);
    }
    Py_END_ALLOW_THREADS
    if (bad_pdf) error = kBadPdf;
    if (error) {
        PyErr_SetString(PyExc_ValueError, error);
        return false;
    }
    return true;
}

bool check_range_bits(int range_bits) {
    if (range_bits < 1 || range_bits > kMaxRangeBits) {
        PyErr_Format(PyExc_ValueError, "total_range_bits must be in [1, %d]", kMaxRangeBits);
        return false;
    }
    return true;
}

// -- streaming encoder: a capsule around Encoder ---------------------------------------------------

const char* kEncoderCapsule = "encodec_fast.arith.Encoder";

struct EncoderBox {
    Encoder enc;
    bool failed = false, finished = false;
    explicit EncoderBox(int bits) : enc(bits) {}
};

void encoder_free(PyObject* capsule) {
    delete static_cast<EncoderBox*>(PyCapsule_GetPointer(capsule, kEncoderCapsule));
}

EncoderBox* usable_encoder(PyObject* capsule) {
    auto* box = static_cast<EncoderBox*>(PyCapsule_GetPointer(capsule, kEncoderCapsule));
    if (!box) return nullptr;
    if (box->finished || box->failed) {
        PyErr_SetString(PyExc_RuntimeError, box->finished ? "the encoder has finished its stream"
                                                          : "the encoder failed on an earlier symbol");
        return nullptr;
    }
    return box;
}

// encoder_new(range_bits) -> capsule
PyObject* py_encoder_new(PyObject*, PyObject* args) {
    int range_bits;
    if (!PyArg_ParseTuple(args, "i", &range_bits) || !check_range_bits(range_bits)) return nullptr;
    auto* box = new EncoderBox(range_bits);
    PyObject* capsule = PyCapsule_New(box, kEncoderCapsule, encoder_free);
    if (!capsule) delete box;
    return capsule;
}

// encoder_push(capsule, table, symbols, N, roundoff, min_range, from_pdfs) -> None
// A failure leaves the encoder unusable (the rows before the failing one were pushed).
PyObject* py_encoder_push(PyObject*, PyObject* args) {
    PyObject *capsule, *table_obj, *sym_obj;
    long long n, min_range;
    int from_pdfs;
    float roundoff;
    if (!PyArg_ParseTuple(args, "OOOLfLp", &capsule, &table_obj, &sym_obj, &n, &roundoff, &min_range, &from_pdfs))
        return nullptr;
    EncoderBox* box = usable_encoder(capsule);
    if (!box) return nullptr;
    if (!push_rows(box->enc, table_obj, sym_obj, n, roundoff, min_range, from_pdfs)) {
        box->failed = true;
        return nullptr;
    }
    Py_RETURN_NONE;
}

// encoder_finish(capsule) -> the whole stream's bytes (flushed); the encoder is then closed
PyObject* py_encoder_finish(PyObject*, PyObject* capsule) {
    EncoderBox* box = usable_encoder(capsule);
    if (!box) return nullptr;
    box->finished = true;
    box->enc.finish();
    return PyBytes_FromStringAndSize(box->enc.out.bytes.data(), static_cast<Py_ssize_t>(box->enc.out.bytes.size()));
}

// -- streaming decoder: a capsule around Decoder + the data buffer --------------------------------

const char* kCapsule = "encodec_fast.arith.Decoder";
PyObject* g_corrupt = nullptr;  // CorruptStream, a ValueError: data no encoder could have written

struct DecoderBox {
    Decoder dec;
    Py_buffer data;
    explicit DecoderBox(int bits) : dec(bits) {}
};

void decoder_free(PyObject* capsule) {
    auto* box = static_cast<DecoderBox*>(PyCapsule_GetPointer(capsule, kCapsule));
    if (box) {
        PyBuffer_Release(&box->data);
        delete box;
    }
}

// decoder_new(data, offset, range_bits) -> capsule
PyObject* py_decoder_new(PyObject*, PyObject* args) {
    PyObject* data_obj;
    long long offset;
    int range_bits;
    if (!PyArg_ParseTuple(args, "OLi", &data_obj, &offset, &range_bits)) return nullptr;
    if (!check_range_bits(range_bits)) return nullptr;
    auto* box = new DecoderBox(range_bits);
    if (PyObject_GetBuffer(data_obj, &box->data, PyBUF_C_CONTIGUOUS) != 0) {
        delete box;
        return nullptr;
    }
    if (offset < 0 || offset > box->data.len) {
        PyBuffer_Release(&box->data);
        delete box;
        PyErr_SetString(PyExc_ValueError, "offset outside the data");
        return nullptr;
    }
    box->dec.in.data = static_cast<const uint8_t*>(box->data.buf);
    box->dec.in.size = box->data.len;
    box->dec.in.bit = offset * 8;
    PyObject* capsule = PyCapsule_New(box, kCapsule, decoder_free);
    if (!capsule) {
        PyBuffer_Release(&box->data);
        delete box;
    }
    return capsule;
}

// decoder_pull(capsule, table, N, out int64[T], roundoff, min_range, from_pdfs) -> number decoded
// Decodes one symbol per row of the table; stops early (returns fewer) when the data runs out.
// A stream that no valid encoder could have written raises ValueError.
PyObject* py_decoder_pull(PyObject*, PyObject* args) {
    PyObject *capsule, *table_obj, *out_obj;
    long long n, min_range;
    int from_pdfs;
    float roundoff;
    if (!PyArg_ParseTuple(args, "OOLOfLp", &capsule, &table_obj, &n, &out_obj, &roundoff, &min_range, &from_pdfs))
        return nullptr;
    auto* box = static_cast<DecoderBox*>(PyCapsule_GetPointer(capsule, kCapsule));
    if (!box) return nullptr;
    Decoder& dec = box->dec;
    if (!check_params(dec.range_bits, min_range, n, roundoff)) return nullptr;
    Buffer table, out;
    if (!table.get(table_obj, from_pdfs ? 'f' : 'q', false, from_pdfs ? "pdfs" : "cdfs") ||
        !out.get(out_obj, 'q', true, "out"))
        return nullptr;
    if (table.count() % n != 0 || out.count() != table.count() / n) {
        PyErr_SetString(PyExc_ValueError, "the table must hold T rows of N values and out T int64");
        return nullptr;
    }
    const int64_t rows = table.count() / n;
    const CdfParams prm{dec.range_bits, roundoff, min_range};
    int64_t done = 0;
    PullStatus status = kPulled;
    bool bad_pdf = false;
    Py_BEGIN_ALLOW_THREADS
    std::vector<int32_t> scratch(from_pdfs ? n : 0);
    for (; done < rows; ++done) {
        int64_t* sym = out.ptr<int64_t>() + done;
        if (from_pdfs) {
            if (!row_ranges(table.ptr<float>() + done * n, n, prm, scratch.data())) {
                bad_pdf = true;
                break;
            }
            status = dec.pull(InRanges{scratch.data(), n}, sym);
        } else {
            status = dec.pull(InCdf{table.ptr<int64_t>() + done * n, n}, sym);
        }
        if (status != kPulled) break;
    }
    Py_END_ALLOW_THREADS
    if (bad_pdf) {
        PyErr_SetString(PyExc_ValueError, kBadPdf);
        return nullptr;
    }
    if (status == kBadCdf) {
        PyErr_SetString(PyExc_ValueError, "CDF values must lie in [0, 2**total_range_bits]");
        return nullptr;
    }
    if (status == kCorrupt) {
        PyErr_Format(g_corrupt,
                     "corrupt arithmetic-coded stream: no symbol matches the data at byte %lld "
                     "(or the distributions differ from the encoder's)",
                     (long long)dec.in.offset());
        return nullptr;
    }
    return PyLong_FromLongLong(done);
}

// decoder_offset(capsule) -> bytes consumed from the start of the data
PyObject* py_decoder_offset(PyObject*, PyObject* capsule) {
    auto* box = static_cast<DecoderBox*>(PyCapsule_GetPointer(capsule, kCapsule));
    if (!box) return nullptr;
    return PyLong_FromLongLong(box->dec.in.offset());
}

PyMethodDef kMethods[] = {
    {"build_cdfs", py_build_cdfs, METH_VARARGS, "build_cdfs(pdfs, out, N, range_bits, roundoff, min_range)"},
    {"encoder_new", py_encoder_new, METH_VARARGS, "encoder_new(range_bits) -> encoder"},
    {"encoder_push", py_encoder_push, METH_VARARGS,
     "encoder_push(encoder, table, symbols, N, roundoff, min_range, from_pdfs) -> None"},
    {"encoder_finish", py_encoder_finish, METH_O, "encoder_finish(encoder) -> bytes"},
    {"decoder_new", py_decoder_new, METH_VARARGS, "decoder_new(data, offset, range_bits) -> decoder"},
    {"decoder_pull", py_decoder_pull, METH_VARARGS,
     "decoder_pull(decoder, table, N, out, roundoff, min_range, from_pdfs) -> number decoded"},
    {"decoder_offset", py_decoder_offset, METH_O, "decoder_offset(decoder) -> bytes consumed"},
    {nullptr, nullptr, 0, nullptr},
};

PyModuleDef kModule = {PyModuleDef_HEAD_INIT, "_arith",
                       "EnCodec's arithmetic coder (C++), bit-exact with upstream; see encodec_fast.ops.arith.", -1,
                       kMethods, nullptr, nullptr, nullptr, nullptr};

}  // namespace

PyMODINIT_FUNC PyInit__arith(void) {
    PyObject* module = PyModule_Create(&kModule);
    if (!module) return nullptr;
    g_corrupt = PyErr_NewException("encodec_fast.kernels._arith.CorruptStream", PyExc_ValueError, nullptr);
    if (!g_corrupt) {
        Py_DECREF(module);
        return nullptr;
    }
    Py_INCREF(g_corrupt);  // the module's reference (PyModule_AddObject steals one on success)
    if (PyModule_AddObject(module, "CorruptStream", g_corrupt) < 0) {
        Py_DECREF(g_corrupt);
        Py_DECREF(module);
        return nullptr;
    }
    return module;
}
