"""``python -m qframe``: the Hydra entry point. Thin: compose, validate, run, print the table."""

import sys


def main() -> None:
    import hydra
    from omegaconf import OmegaConf

    from qframe.config import register, to_config
    from qframe.errors import QFrameError

    register()

    @hydra.main(version_base=None, config_path="conf", config_name="config")
    def _main(cfg) -> None:
        from hydra.core.hydra_config import HydraConfig

        from qframe.app import results_table, run

        try:
            config = to_config(cfg)
            metrics = run(config, HydraConfig.get().runtime.output_dir, OmegaConf.to_container(cfg, resolve=True))
        except QFrameError as exc:
            print(f"qframe: error: {exc}", file=sys.stderr)
            sys.exit(2)
        print("\n" + results_table(metrics) + f"\n\nresults in {HydraConfig.get().runtime.output_dir}")

    _main()


if __name__ == "__main__":
    main()
