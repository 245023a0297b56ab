from model.llama import Llama, LlamaArgs, available_sizes, build_model, size_table

__all__ = ["Llama", "LlamaArgs", "available_sizes", "build_model", "size_table"]
