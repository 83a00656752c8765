// Renders /openapi.json as a page: endpoints (with examples and responses), then every schema.
"use strict";

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs || {})) node.setAttribute(key, value);
  for (const child of children) node.append(child instanceof Node ? child : String(child));
  return node;
}

function refName(ref) { return ref.split("/").pop(); }

function typeOf(schema) {
  if (!schema) return "";
  if (schema.$ref) return refName(schema.$ref);
  if (schema.anyOf) return schema.anyOf.map(typeOf).join(" | ");
  if (schema.type === "array") return `${typeOf(schema.items)}[]`;
  if (schema.enum) return schema.enum.map((v) => JSON.stringify(v)).join(" | ");
  if (schema.const !== undefined) return JSON.stringify(schema.const);
  if (schema.type === "object" && schema.additionalProperties) return `{string: ${typeOf(schema.additionalProperties)}}`;
  return schema.type || "any";
}

function limits(schema) {
  const parts = [];
  const add = (key, label) => { if (schema[key] !== undefined) parts.push(`${label} ${schema[key]}`); };
  add("minimum", "≥"); add("exclusiveMinimum", ">"); add("maximum", "≤"); add("exclusiveMaximum", "<");
  add("minLength", "min length"); add("maxLength", "max length"); add("minItems", "min items"); add("maxItems", "max items");
  for (const option of schema.anyOf || []) parts.push(...limits(option));
  return parts;
}

function schemaLink(schema) {
  const name = typeOf(schema);
  return schema && schema.$ref ? el("a", { href: `#schema-${name}` }, name) : el("code", {}, name);
}

function schemaTable(schema) {
  const table = el("table", {}, el("tr", {}, el("th", {}, "field"), el("th", {}, "type"), el("th", {}, "default"),
    el("th", {}, "limits"), el("th", {}, "meaning")));
  const required = new Set(schema.required || []);
  for (const [name, prop] of Object.entries(schema.properties || {})) {
    const type = prop.$ref ? schemaLink(prop) : el("code", {}, typeOf(prop));
    const fallback = "default" in prop ? JSON.stringify(prop.default) : required.has(name) ? "required" : "";
    table.append(el("tr", {}, el("td", {}, el("code", {}, name)), el("td", {}, type), el("td", {}, fallback),
      el("td", {}, limits(prop).join(", ")), el("td", {}, prop.description || "")));
  }
  return table;
}

function curlExample(method, path, example, secured) {
  const auth = secured ? ' -H "Authorization: Bearer $CHARRNN_KEY"' : "";
  const body = example ? ` -H 'Content-Type: application/json' -d '${JSON.stringify(example)}'` : "";
  return `curl -X ${method.toUpperCase()} ${location.origin}${path}${auth}${body}`;
}

function renderEndpoint(doc, path, method, op) {
  const secured = (op.security || doc.security || []).length > 0;
  const box = el("div", { class: "endpoint", id: `${method}-${path}` },
    el("div", {}, el("span", { class: `method ${method}` }, method.toUpperCase()), el("span", { class: "path" }, path)),
    el("p", {}, op.summary || ""));
  if (op.description) box.append(el("p", {}, op.description));
  const content = op.requestBody && op.requestBody.content["application/json"];
  if (content) {
    box.append(el("h4", {}, "Request body: ", schemaLink(content.schema)));
    box.append(el("pre", {}, curlExample(method, path, content.example, secured)));
  } else if (method === "get") {
    box.append(el("pre", {}, curlExample(method, path, null, secured)));
  }
  const responses = el("table", {}, el("tr", {}, el("th", {}, "status"), el("th", {}, "meaning"), el("th", {}, "body")));
  for (const [status, response] of Object.entries(op.responses || {})) {
    const json = response.content && response.content["application/json"];
    responses.append(el("tr", {}, el("td", { class: "status" }, status), el("td", {}, response.description || ""),
      el("td", {}, json ? schemaLink(json.schema) : "")));
  }
  box.append(el("h4", {}, "Responses"), responses);
  return box;
}

function render(doc) {
  document.getElementById("title").textContent = doc.info.title;
  document.getElementById("description").textContent = doc.info.description || "";
  const endpoints = document.getElementById("endpoints");
  endpoints.replaceChildren(el("h2", {}, "Endpoints"));
  const toc = document.getElementById("toc");
  for (const [path, item] of Object.entries(doc.paths)) {
    for (const [method, op] of Object.entries(item)) {
      endpoints.append(renderEndpoint(doc, path, method, op));
      toc.append(el("a", { href: `#${method}-${path}` }, `${method.toUpperCase()} ${path}`));
    }
  }
  const schemas = document.getElementById("schemas");
  schemas.replaceChildren(el("h2", {}, "Schemas"));
  for (const [name, schema] of Object.entries(doc.components.schemas)) {
    schemas.append(el("h3", { id: `schema-${name}` }, name), el("p", {}, schema.description || ""), schemaTable(schema));
  }
}

fetch("openapi.json")
  .then((response) => response.json())
  .then(render)
  .catch((error) => {
    document.getElementById("endpoints").textContent = `Could not load openapi.json: ${error}`;
  });
