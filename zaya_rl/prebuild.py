"""Builds DeepSpeed's JIT ops once at install time, so no run pays for the compile."""

if __name__ == "__main__":
    from deepspeed.ops.op_builder import ShareMemCommBuilder  # noqa: F401

    from deepspeed.accelerator import get_accelerator

    if get_accelerator().device_name() == "cpu":
        ShareMemCommBuilder().load()
