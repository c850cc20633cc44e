"""The API's table of methods (it never imports the engine) equals what the engine registers."""
from __future__ import annotations

from app.jobs.methods import METHODS
from worker.engine.registry import all_methods


def test_api_method_table_matches_engine_registry():
    engine = {(m.kind, m.name): (frozenset(m.input_formats), frozenset(m.output_formats), bool(m.needs_dataset))
              for m in all_methods()}
    api = {key: (rule.input_formats, rule.output_formats, rule.needs_dataset) for key, rule in METHODS.items()}
    assert api == engine


def test_api_config_defaults_match_engine_defaults():
    from app.jobs import schemas
    from worker.engine.registry import find_method

    for kind, method, schema in (("quantize", "static_int8", schemas.QuantizeConfig),
                                 ("prune", "channels", schemas.PruneConfig)):
        engine_cfg = find_method(kind, method).config_cls.from_dict({}).to_dict()
        api_cfg = schema(method=method).model_dump(mode="json")
        shared = set(engine_cfg) & set(api_cfg)
        assert shared, (kind, method)
        assert {k: api_cfg[k] for k in shared} == {k: engine_cfg[k] for k in shared}, (kind, method)


def test_api_distill_defaults_match_engine_defaults():
    """Every distill key the engine reads is a key of the API's schema with the same default: the API stores the
    config with its defaults filled in, so an engine default the API does not share would never apply."""
    from app.jobs import schemas
    from worker.engine.distill import DistillConfig

    for student in ({"arch": "mlp"}, {"arch": "cnn"}, {"shrink": 0.5}):
        engine_cfg = DistillConfig.from_dict({"student": student}).to_dict()
        engine_cfg.pop("max_accuracy_drop")  # the engine's base config; a distill job has no accuracy budget
        api_cfg = schemas.DistillConfig.model_validate({"student": student}).model_dump(mode="json")
        assert set(engine_cfg) <= set(api_cfg), sorted(set(engine_cfg) - set(api_cfg))
        assert {k: api_cfg[k] for k in engine_cfg} == engine_cfg
