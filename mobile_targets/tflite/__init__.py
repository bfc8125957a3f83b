"""The TFLite target in one place: `converter` (litert-torch, ai-edge-quantizer, the Target and
its LiteRT interpreter runner) and `profiler` (LiteRT's own per-op profiler, reached through
libLiteRt's C API)."""
