"""The compat session: every converted file in a matrix of runtime builds (`matrix`), each runtime
in its own environment (`runtimes`), driven by a worker that imports only the runtime (`worker`)."""
