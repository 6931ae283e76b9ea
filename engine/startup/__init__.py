"""Start-up I/O: readahead of the first shards, warm files, the CUDA context created beside the imports."""
