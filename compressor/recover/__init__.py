"""Recovery after pruning: distillation from the dense model, in memory (`distill`) or one layer
at a time for a model that does not fit (`streamed`)."""
