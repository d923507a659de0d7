"""Pipeline stages: prepare, train, sample, evaluate. Each takes its validated config."""
