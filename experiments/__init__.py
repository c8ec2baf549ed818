"""absl launchers, benchmarks and scripts. The only place that defines command-line flags."""
