"""Model files in and out: format detection by content, safe unpickling, Hugging Face folders,
safetensors, and compressor's own folders."""
