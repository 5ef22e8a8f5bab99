"""Custom ComfyUI socket types of the pack, in one place so that every node agrees."""

TRANSFORMER = "WANS2V_TRANSFORMER"  # the S2V transformer alone (trainable)
MODEL = "WANS2V_MODEL"  # transformer + VAE + text encoder + audio encoder (sampling)
DATASET = "WANS2V_DATASET"  # cached, audio-aligned training windows
TRAINED_LORA = "WANS2V_LORA"  # the LoRA a training node just produced (in memory)
LORA_STACK = "WANS2V_LORA_STACK"  # LoRAs with strengths to apply while sampling
LORA_SETTINGS = "WANS2V_LORA_SETTINGS"
OPTIMIZER_SETTINGS = "WANS2V_OPTIMIZER_SETTINGS"
SCHEDULE_SETTINGS = "WANS2V_SCHEDULE_SETTINGS"
TREAD_SETTINGS = "WANS2V_TREAD_SETTINGS"  # TREAD token routes (SimpleTuner's {"routes": [...]})
CREPA_SETTINGS = "WANS2V_CREPA_SETTINGS"  # trainer.train.config.CrepaConfig
MEMORY_SETTINGS = "WANS2V_MEMORY_SETTINGS"  # trainer.memory.MemoryConfig
VALIDATION_SETTINGS = "WANS2V_VALIDATION_SETTINGS"  # renders during training (nodes.train_runner)
