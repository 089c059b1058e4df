"""What stands between a face and the models: configuration, keys and the guard, limits, routing to upstreams and
their health, metrics, the generation backends, and how an error becomes an answer. Nothing here imports a face."""
