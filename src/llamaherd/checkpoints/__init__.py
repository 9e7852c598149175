"""Checkpoint readers and writers. Every reader yields tensors under llamaherd's internal names.

Internal names are Hugging Face Llama's, for every family (Falcon is mapped on read and write):
  model.embed_tokens.weight
  model.layers.{i}.input_layernorm.{weight,bias}          norm before attention (Falcon-7B: before both)
  model.layers.{i}.self_attn.{q,k,v,o}_proj.{weight,bias}  q/k rows in HF "rotate-half" RoPE order
  model.layers.{i}.post_attention_layernorm.{weight,bias}  norm before the MLP (absent with a shared norm)
  model.layers.{i}.mlp.{gate,up,down}_proj.{weight,bias}   GELU MLPs have up/down only
  model.norm.{weight,bias}
  lm_head.weight                                           absent when embeddings are tied
"""
