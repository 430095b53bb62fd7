"""Pure torch math: the regularizer losses, chunked logits (CE / KL from hidden states), padding."""
