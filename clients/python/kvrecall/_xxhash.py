"""XXH3 for the client: Debian's `xxhash` module when installed, else the
same functions over the C library libxxhash.so.0 through ctypes (machines
whose Python lacks the module but carry the library, e.g. next to
kvrecalld). Exposes `xxhash` with xxh3_64_intdigest(data, seed=0) and
xxh3_128(data, seed=0).digest() (canonical big-endian bytes)."""

try:
    import xxhash  # noqa: F401
except ImportError:  # pragma: no cover - exercised where the module is missing
    import ctypes
    import ctypes.util
    import os
    import struct

    class _XXH128(ctypes.Structure):
        _fields_ = [("low64", ctypes.c_uint64), ("high64", ctypes.c_uint64)]

    def _load():
        names = [os.environ.get("KVRECALL_XXHASH_LIB"), "libxxhash.so.0",
                 ctypes.util.find_library("xxhash")]
        errors = []
        for n in names:
            if not n:
                continue
            try:
                return ctypes.CDLL(n)
            except OSError as e:
                errors.append(str(e))
        raise ImportError("kvrecall needs the python xxhash module or libxxhash.so.0 "
                          "(set KVRECALL_XXHASH_LIB): " + "; ".join(errors))

    _lib = _load()
    _lib.XXH3_64bits_withSeed.restype = ctypes.c_uint64
    _lib.XXH3_64bits_withSeed.argtypes = [ctypes.c_char_p, ctypes.c_size_t, ctypes.c_uint64]
    _lib.XXH3_128bits_withSeed.restype = _XXH128
    _lib.XXH3_128bits_withSeed.argtypes = [ctypes.c_char_p, ctypes.c_size_t, ctypes.c_uint64]

    class _Digest128:
        def __init__(self, data, seed):
            data = bytes(data)
            self._h = _lib.XXH3_128bits_withSeed(data, len(data), seed)

        def digest(self):
            return struct.pack(">QQ", self._h.high64, self._h.low64)

        def hexdigest(self):
            return self.digest().hex()

    class xxhash:  # noqa: N801 - stands in for the module
        @staticmethod
        def xxh3_64_intdigest(data, seed=0):
            data = bytes(data)
            return _lib.XXH3_64bits_withSeed(data, len(data), seed)

        @staticmethod
        def xxh3_128(data, seed=0):
            return _Digest128(data, seed)
