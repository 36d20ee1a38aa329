"""Tools around the dispatcher: the demo, the terminal handset and the benchmarks."""
