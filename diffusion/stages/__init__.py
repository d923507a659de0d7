"""Pipeline stages: validate, prepare, train, train_classifier, sample, evaluate. Each takes its validated config."""
