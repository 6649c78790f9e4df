"""Teacher side: Cloud et al. number prompts, teacher sampling, the filter with its audit, control datasets,
and the dataset directories students train on."""
