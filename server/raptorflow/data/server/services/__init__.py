"""The servicer edge: one thin servicer per proto service, plus health and the error map."""
