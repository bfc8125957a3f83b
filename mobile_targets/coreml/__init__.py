"""The Core ML target in one place: `converter` (coremltools, graph patches, the Target and its
runners), `emulator` (reads an .mlpackage and runs its ML Program off Apple) and `mil_ops` (the
emulator's kernels, one per MIL op)."""
