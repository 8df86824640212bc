"""Test helper shared by tests/peft and tests/test_demo.py: an empty torch twin of a minilora module tree.

torch is passed in (callers `pytest.importorskip` it), so importing this module never needs torch.
"""


def torch_tree(module, torch):
    """torch.nn modules with the same dotted names and parameter shapes as a minilora module tree (Linear,
    Embedding, LayerNorm leaves; plain torch.nn.Module nodes), ready for `load_state_dict` of our weights."""
    from minilora.nn import Embedding, LayerNorm, Linear
    if isinstance(module, Linear):
        return torch.nn.Linear(module.in_features, module.out_features, bias=module.bias is not None)
    if isinstance(module, Embedding):
        return torch.nn.Embedding(module.num_embeddings, module.embedding_dim)
    if isinstance(module, LayerNorm):
        return torch.nn.LayerNorm(module.ndim, eps=module.eps, bias=module.bias is not None)
    node = torch.nn.Module()
    for name, child in module.named_children():
        node.add_module(name, torch_tree(child, torch))
    return node


def torch_copy_of(model, torch):
    """The torch twin holding exactly `model`'s (base) weights, ready to be wrapped by Hugging Face PEFT."""
    import numpy as np
    tree = torch_tree(model, torch)
    tree.prepare_inputs_for_generation = lambda *a, **k: {}      # PeftModelForCausalLM (task_type) asks for it
    tree.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in model.state_dict().items()}, strict=True)
    return tree
