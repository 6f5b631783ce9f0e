"""The connectors implement every upstream method recorded in engine_interfaces.json with the
same parameters, and the stand-ins the other tests run against declare exactly those."""

import importlib
import inspect
import json
import os
import unittest

MANIFEST = os.path.join(os.path.dirname(os.path.abspath(__file__)), "engine_interfaces.json")
STANDIN_MODULES = {
    "vllm": "vllm.distributed.kv_transfer.kv_connector.v1.base",
    "sglang": "sglang.srt.disaggregation.base.conn",
}


def parameters(function):
    """Parameter names as the manifest writes them ('**kwargs', '*args')."""
    names = []
    for p in inspect.signature(function).parameters.values():
        prefix = {inspect.Parameter.VAR_KEYWORD: "**", inspect.Parameter.VAR_POSITIONAL: "*"}.get(p.kind, "")
        names.append(prefix + p.name)
    return names


def unbound(cls, name):
    """The function behind cls.name, with self/cls as its first parameter."""
    attribute = inspect.getattr_static(cls, name)
    return attribute.__func__ if isinstance(attribute, (classmethod, staticmethod)) else attribute


def load(spec):
    module, _, name = spec.partition(":")
    return getattr(importlib.import_module(module), name)


class EngineInterfaces(unittest.TestCase):

    def setUp(self):
        with open(MANIFEST) as f:
            self.manifest = {k: v for k, v in json.load(f).items() if not k.startswith("_")}

    def test_manifest_names_its_source(self):
        for engine, entry in self.manifest.items():
            self.assertRegex(entry["read_at"], r"^[\w-]+/[\w-]+@[0-9a-f]{40}$", engine)
            self.assertTrue(entry["path"].endswith(".py"), engine)

    def test_standins_declare_the_recorded_signatures(self):
        for engine, entry in self.manifest.items():
            module = importlib.import_module(STANDIN_MODULES[engine])
            for class_name, methods in entry["classes"].items():
                cls = getattr(module, class_name)
                for method, expected in methods.items():
                    with self.subTest(engine=engine, method="%s.%s" % (class_name, method)):
                        self.assertEqual(parameters(unbound(cls, method)), expected)

    def test_connectors_implement_every_method_with_the_same_parameters(self):
        for engine, entry in self.manifest.items():
            for role, spec in entry["implementations"].items():
                cls = load(spec["class"])
                base = getattr(importlib.import_module(STANDIN_MODULES[engine]), spec["base"])
                self.assertTrue(issubclass(cls, base), "%s is not a %s" % (cls, spec["base"]))
                for class_name in spec.get("also", []):
                    self.assertTrue(issubclass(cls, getattr(importlib.import_module(STANDIN_MODULES[engine]),
                                                            class_name)))
                for class_name in [spec["base"]] + spec.get("also", []):
                    for method, expected in entry["classes"][class_name].items():
                        with self.subTest(engine=engine, role=role, method=method):
                            self.assertEqual(parameters(unbound(cls, method)), expected)
                for method in spec["overridden"]:
                    with self.subTest(engine=engine, role=role, overridden=method):
                        self.assertIn(method, cls.__dict__, "%s does not define %s itself" % (cls.__name__, method))


if __name__ == "__main__":
    unittest.main()
