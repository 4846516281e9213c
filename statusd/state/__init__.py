"""Pure state: values and state machines with no trio and no I/O."""
