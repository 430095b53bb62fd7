"""Anti-forgetting terms: one module per method behind one interface (:mod:`gere_plugin.methods.base`)."""
