"""Write a FileDescriptorProto back as .proto source that protoc compiles to the same descriptor.

Rules:

* every element keeps its place in its list (fields, nested messages, enums, values,
  extensions, imports), so the compiled descriptor lists them in the same order;
* type references are written fully qualified (leading dot), so no scope lookup can pick a
  different type;
* options, custom ones included, are written from the option messages parsed with the
  extensions of the pool passed in, so every annotation survives;
* a feature this writer does not render (editions, groups, defaults, extension ranges) is an
  error, never silently dropped.

Comments are not part of a descriptor, so the source carries only the header it is given.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from google.protobuf import (
    descriptor_pb2,
    descriptor_pool,
    message_factory,
    text_encoding,
    text_format,
)
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message

FDP = descriptor_pb2.FieldDescriptorProto
_SCALARS = {
    FDP.TYPE_DOUBLE: "double",
    FDP.TYPE_FLOAT: "float",
    FDP.TYPE_INT64: "int64",
    FDP.TYPE_UINT64: "uint64",
    FDP.TYPE_INT32: "int32",
    FDP.TYPE_FIXED64: "fixed64",
    FDP.TYPE_FIXED32: "fixed32",
    FDP.TYPE_BOOL: "bool",
    FDP.TYPE_STRING: "string",
    FDP.TYPE_BYTES: "bytes",
    FDP.TYPE_UINT32: "uint32",
    FDP.TYPE_SFIXED32: "sfixed32",
    FDP.TYPE_SFIXED64: "sfixed64",
    FDP.TYPE_SINT32: "sint32",
    FDP.TYPE_SINT64: "sint64",
}
_FIELD_MAX = 536870911  # the largest field number; a message's reserved range ends after it
_ENUM_MAX = 2147483647
_INDENT = "  "


class UnsupportedProto(Exception):
    """The descriptor uses a feature this writer does not render."""


@dataclass(frozen=True, slots=True)
class Options:
    """Renders option messages with the custom options (extensions) a pool knows."""

    pool: descriptor_pool.DescriptorPool

    def entries(self, options: Message, kind: str) -> list[str]:
        """``name = value`` for every option set in ``options`` (a ``google.protobuf.<kind>``)."""
        cls = message_factory.GetMessageClass(
            self.pool.FindMessageTypeByName(f"google.protobuf.{kind}")
        )
        parsed = cls.FromString(options.SerializeToString())
        out: list[str] = []
        for field, value in parsed.ListFields():
            name = f"({field.full_name})" if field.is_extension else field.name
            values = value if field.is_repeated else [value]
            out.extend(f"{name} = {_value(field, item)}" for item in values)
        return out

    def statements(self, options: Message, kind: str, indent: str) -> list[str]:
        """The options as ``option …;`` lines (files, messages, enums, oneofs, services)."""
        return [f"{indent}option {entry};" for entry in self.entries(options, kind)]

    def brackets(self, options: Message, kind: str) -> str:
        """The options as a `` [a = 1, b = 2]`` suffix (fields, enum values), or nothing."""
        entries = self.entries(options, kind)
        return f" [{', '.join(entries)}]" if entries else ""


def _value(field: FieldDescriptor, value: object) -> str:
    """One option value in .proto syntax."""
    if field.type == FieldDescriptor.TYPE_MESSAGE:
        assert isinstance(value, Message)
        return "{" + text_format.MessageToString(value, as_one_line=True) + "}"
    if field.type == FieldDescriptor.TYPE_ENUM:
        assert isinstance(value, int)
        assert field.enum_type is not None
        return str(field.enum_type.values_by_number[value].name)
    if field.type == FieldDescriptor.TYPE_BOOL:
        return "true" if value else "false"
    if field.type == FieldDescriptor.TYPE_STRING:
        assert isinstance(value, str)
        return '"' + text_encoding.CEscape(value, as_utf8=True) + '"'
    if field.type == FieldDescriptor.TYPE_BYTES:
        assert isinstance(value, bytes)
        return '"' + text_encoding.CEscape(value, as_utf8=False) + '"'
    return repr(value)


def render(fd: descriptor_pb2.FileDescriptorProto, options: Options, header: Sequence[str]) -> str:
    """The .proto source of ``fd``, opening with ``header`` as line comments."""
    if fd.syntax not in ("proto2", "proto3", ""):
        raise UnsupportedProto(f"{fd.name}: syntax {fd.syntax!r}")
    writer = _File(fd, options)
    lines = [f"// {line}".rstrip() for line in header]
    lines += ["", f'syntax = "{fd.syntax or "proto2"}";', "", f"package {fd.package};", ""]
    lines += list(writer.imports())
    lines += options.statements(fd.options, "FileOptions", "")
    scope = f".{fd.package}" if fd.package else ""
    for message in fd.message_type:
        lines += ["", *writer.message(message, "", scope)]
    for enum in fd.enum_type:
        lines += ["", *writer.enum(enum, "")]
    for service in fd.service:
        lines += ["", *writer.service(service)]
    lines += list(writer.extensions(fd.extension, ""))
    return "\n".join(lines) + "\n"


class _File:
    """The writer of one file's elements."""

    def __init__(self, fd: descriptor_pb2.FileDescriptorProto, options: Options) -> None:
        self.fd = fd
        self.options = options
        self.proto3 = fd.syntax == "proto3"

    def imports(self) -> Iterator[str]:
        public, weak = set(self.fd.public_dependency), set(self.fd.weak_dependency)
        for index, name in enumerate(self.fd.dependency):
            kind = "public " if index in public else "weak " if index in weak else ""
            yield f'import {kind}"{name}";'
        if self.fd.dependency:
            yield ""

    def message(self, msg: descriptor_pb2.DescriptorProto, indent: str, scope: str) -> list[str]:
        """``msg`` declared in ``scope`` (the dotted full name of its parent, leading dot)."""
        if msg.extension_range:
            raise UnsupportedProto(f"{self.fd.name}: extension ranges in {msg.name}")
        inner, name = indent + _INDENT, f"{scope}.{msg.name}"
        maps = {f"{name}.{n.name}": n for n in msg.nested_type if n.options.map_entry}
        lines = [f"{indent}message {msg.name} {{"]
        lines += self.options.statements(msg.options, "MessageOptions", inner)
        spans = [(item.start, item.end - 1) for item in msg.reserved_range]  # end is exclusive
        lines += list(_reserved(spans, msg.reserved_name, inner, _FIELD_MAX))
        for enum in msg.enum_type:
            lines += self.enum(enum, inner)
        lines += list(self._body(msg, maps, inner, name))
        lines += list(self.extensions(msg.extension, inner))
        lines.append(f"{indent}}}")
        return lines

    def _body(
        self,
        msg: descriptor_pb2.DescriptorProto,
        maps: dict[str, descriptor_pb2.DescriptorProto],
        indent: str,
        name: str,
    ) -> Iterator[str]:
        """Fields and nested messages, interleaved as protoc needs to list them in order.

        protoc appends a map field's entry message to the nested types where the field is
        declared, so every nested message listed before that entry is written before the field.
        """
        nested = list(msg.nested_type)
        written = 0
        done: set[int] = set()
        for field in msg.field:
            entry = _map_entry(field, maps)
            if entry is not None:
                upto = nested.index(entry)
                yield from self._messages(nested[written:upto], indent, name)
                written = upto + 1
            if field.HasField("oneof_index") and not field.proto3_optional:
                if field.oneof_index not in done:
                    done.add(field.oneof_index)
                    yield from self._oneof(msg, field.oneof_index, maps, indent)
            else:
                yield self.field(field, maps, indent, self._label(field))
        yield from self._messages(nested[written:], indent, name)

    def _messages(
        self, messages: Sequence[descriptor_pb2.DescriptorProto], indent: str, scope: str
    ) -> Iterator[str]:
        for nested in messages:
            if not nested.options.map_entry:
                yield from self.message(nested, indent, scope)

    def _oneof(
        self,
        msg: descriptor_pb2.DescriptorProto,
        index: int,
        maps: dict[str, descriptor_pb2.DescriptorProto],
        indent: str,
    ) -> Iterator[str]:
        decl = msg.oneof_decl[index]
        yield f"{indent}oneof {decl.name} {{"
        yield from self.options.statements(decl.options, "OneofOptions", indent + _INDENT)
        for field in msg.field:
            if field.HasField("oneof_index") and field.oneof_index == index:
                yield self.field(field, maps, indent + _INDENT, label="")
        yield f"{indent}}}"

    def field(
        self,
        field: descriptor_pb2.FieldDescriptorProto,
        maps: dict[str, descriptor_pb2.DescriptorProto],
        indent: str,
        label: str,
    ) -> str:
        """One field declaration; ``label`` is its ``repeated ``/``optional `` prefix, if any."""
        if field.type == FDP.TYPE_GROUP or field.HasField("default_value"):
            raise UnsupportedProto(f"{self.fd.name}: group or default in {field.name}")
        entry = _map_entry(field, maps)
        if entry is not None:
            key, value = entry.field
            kind = f"map<{_type(key)}, {_type(value)}>"
        else:
            kind = label + _type(field)
        suffix = self.options.brackets(field.options, "FieldOptions")
        if field.HasField("json_name") and field.json_name != _json_name(field.name):
            suffix = _add_option(suffix, f'json_name = "{field.json_name}"')
        return f"{indent}{kind} {field.name} = {field.number}{suffix};"

    def _label(self, field: descriptor_pb2.FieldDescriptorProto) -> str:
        """The label a field outside a oneof is written with."""
        if field.label == FDP.LABEL_REPEATED:
            return "repeated "
        if field.label == FDP.LABEL_REQUIRED:
            return "required "
        if field.proto3_optional or not self.proto3:
            return "optional "
        return ""

    def enum(self, enum: descriptor_pb2.EnumDescriptorProto, indent: str) -> list[str]:
        inner = indent + _INDENT
        lines = [f"{indent}enum {enum.name} {{"]
        lines += self.options.statements(enum.options, "EnumOptions", inner)
        spans = [(item.start, item.end) for item in enum.reserved_range]  # end is inclusive
        lines += list(_reserved(spans, enum.reserved_name, inner, _ENUM_MAX))
        for value in enum.value:
            suffix = self.options.brackets(value.options, "EnumValueOptions")
            lines.append(f"{inner}{value.name} = {value.number}{suffix};")
        lines.append(f"{indent}}}")
        return lines

    def service(self, service: descriptor_pb2.ServiceDescriptorProto) -> list[str]:
        lines = [f"service {service.name} {{"]
        lines += self.options.statements(service.options, "ServiceOptions", _INDENT)
        for method in service.method:
            into = "stream " if method.client_streaming else ""
            out = "stream " if method.server_streaming else ""
            opts = self.options.statements(method.options, "MethodOptions", _INDENT * 2)
            head = (
                f"{_INDENT}rpc {method.name}({into}{method.input_type}) "
                f"returns ({out}{method.output_type})"
            )
            # protoc records (empty) options for a method written with a body, none without.
            has_body = method.HasField("options")
            lines += [f"{head} {{", *opts, f"{_INDENT}}}"] if has_body else [f"{head};"]
        lines.append("}")
        return lines

    def extensions(
        self, fields: Sequence[descriptor_pb2.FieldDescriptorProto], indent: str
    ) -> Iterator[str]:
        """``extend`` blocks, a new one whenever the extended message changes."""
        extendee = None
        for field in fields:
            if field.extendee != extendee:
                if extendee is not None:
                    yield f"{indent}}}"
                extendee = field.extendee
                yield ""
                yield f"{indent}extend {extendee} {{"
            yield self.field(field, {}, indent + _INDENT, self._label(field))
        if extendee is not None:
            yield f"{indent}}}"


def _map_entry(
    field: descriptor_pb2.FieldDescriptorProto, maps: dict[str, descriptor_pb2.DescriptorProto]
) -> descriptor_pb2.DescriptorProto | None:
    """The map entry message a repeated field stands for, if it is a map."""
    return maps.get(field.type_name) if field.label == FDP.LABEL_REPEATED else None


def _type(field: descriptor_pb2.FieldDescriptorProto) -> str:
    if field.type in (FDP.TYPE_MESSAGE, FDP.TYPE_ENUM):
        return field.type_name
    return _SCALARS[field.type]


def _json_name(name: str) -> str:
    """protoc's default JSON name: underscores dropped, the letter after each capitalised."""
    head, *rest = name.split("_")
    return head + "".join(part[:1].upper() + part[1:] for part in rest)


def _add_option(suffix: str, entry: str) -> str:
    return f"{suffix[:-1]}, {entry}]" if suffix else f" [{entry}]"


def _reserved(
    spans: Sequence[tuple[int, int]], names: Sequence[str], indent: str, top: int
) -> Iterator[str]:
    """``reserved`` lines for the (first, last) number spans and the names; ``top`` is max."""
    for first, last in spans:
        if last == first:
            yield f"{indent}reserved {first};"
        else:
            yield f"{indent}reserved {first} to {'max' if last == top else last};"
    for name in names:
        yield f'{indent}reserved "{name}";'
