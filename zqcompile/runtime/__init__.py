"""Running compiled graphs: the engine, its file format, the weight store, CUDA-graph replay."""
