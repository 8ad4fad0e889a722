"""Key backends: each turns a data key into a wrapped blob and back."""
