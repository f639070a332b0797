"""Models: files, tokenizer, sampling, generated weights and the session that runs them.

gguf_file   the GGUF container read by hand (header, metadata, tensor table), memory-mapped
gguf        model files: the config, the checks, the weights
dequant     block types dequantized on every core, with the gguf package's decoders
tokenizer   sentencepiece built from a GGUF vocabulary (cached per file)
sampling    llama.cpp's sampler chain
weights     generated ("dummy") weights of any shape
packaged    models by name (the real Gemma 3 270M), assembled into $STREAMGRAPH_MODELS
session     a model plan, KV caches, prefill, decode and generation through cached executors
perplexity  llama-perplexity's scoring
"""
