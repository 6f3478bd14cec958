"""The data: annotation files read and validated once into a memory-mapped store, the torch Dataset over it, the
merge rule, the samplers (eq 8 of the concurrent-softmax paper), the concurrent-rate matrix r_ij, long-tail statistics,
the Open Images converters and the synthetic benchmark."""
