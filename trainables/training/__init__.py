"""One trial's training: the epoch loop, losses, optimisers, metrics, and the reporter that
is the loop's one interface to the outside."""
