"""minilora.peft: Hugging Face PEFT's LoRA API on minilora's NumPy/CuPy models, writing PEFT's adapter files.

    from minilora.nn import GPT, GPTConfig
    from minilora.peft import LoraConfig, get_peft_model, PeftModel
    cfg = GPTConfig(vocab_size=256, block_size=128, n_layer=4, n_head=4, n_embd=256)
    model = get_peft_model(GPT(cfg), LoraConfig(r=8, lora_alpha=16, target_modules=["c_attn"]))
    model.print_trainable_parameters()
    # trainable params: 32,768 || all params: 3,356,160 || trainable%: 0.9764
    model.save_pretrained("out")           # adapter_config.json + adapter_model.safetensors, loadable by PEFT
    model = PeftModel.from_pretrained(GPT(cfg), "out")   # also reads adapters saved by PEFT

Files: `config.py` (LoraConfig, target matching), `model.py` (get_peft_model, PeftModel, LoraModel),
`save_and_load.py` (the adapter file format), `utils.py` (quantize_model, prepare_model_for_kbit_training,
memory_report). Each mirrors the PEFT file of the same name.
"""
from minilora.peft.config import (
                                  CONFIG_NAME,
                                  TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING,
                                  WEIGHTS_NAME,
                                  LoftQConfig,
                                  LoraConfig,
                                  check_target_module_exists,
)
from minilora.peft.model import LoraModel, ModulesToSaveWrapper, PeftModel, get_peft_model
from minilora.peft.save_and_load import get_peft_model_state_dict, set_peft_model_state_dict
from minilora.peft.utils import (
                                  format_memory_report,
                                  memory_report,
                                  prepare_model_for_kbit_training,
                                  print_memory_report,
                                  quantize_model,
)

__all__ = ["LoraConfig", "LoftQConfig", "check_target_module_exists", "get_peft_model", "PeftModel", "LoraModel",
           "ModulesToSaveWrapper", "get_peft_model_state_dict", "set_peft_model_state_dict", "quantize_model",
           "prepare_model_for_kbit_training", "memory_report", "format_memory_report", "print_memory_report",
           "CONFIG_NAME", "WEIGHTS_NAME", "TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING"]
