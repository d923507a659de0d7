"""Pipeline stages, one module each (dvc.yaml runs them as ``diffusion <stage>``): validate, prepare, train_vae,
encode, encode_text, train, train_classifier, train_digit_classifier, fit_schedule, sample, evaluate. Each takes
its validated config."""
