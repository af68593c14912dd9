//! The OpenAPI 3.1 document of `/v1/`, served at `/v1/openapi.json`. Request and response
//! schemas are derived from the same types the API parses and answers with, so the document
//! cannot drift from the API; `crates/weir/tests/platform.rs` checks real answers against it.

use schemars::JsonSchema;
use schemars::generate::SchemaSettings;
use serde_json::{Map, Value, json};

use crate::functions::{CreateFunction, InvokeInput, Invocation, PatchFunction, Shown};
use crate::grants::{Application, CreateApplication, CreateGrant, Grant, PatchApplication, Regenerate};
use crate::lifecycle::{DeployInput, Deployed, Deployment, FileDiff, HistoryEntry, RollbackInput};
use crate::model::{CreateGateway, Environment, Gateway, PatchEnvironment, PatchGateway};
use crate::tokens::{CreateToken, Token};
use crate::triggers::{CreateTrigger, Run, Trigger};

/// `T`'s schema as JSON Schema 2020-12 (OpenAPI 3.1's dialect), inline.
fn schema<T: JsonSchema>() -> Value {
    let mut settings = SchemaSettings::draft2020_12();
    settings.inline_subschemas = true;
    let mut s = settings.into_generator().into_root_schema_for::<T>().to_value();
    if let Some(o) = s.as_object_mut() {
        o.remove("$schema");
    }
    s
}

fn without(mut schema: Value, hidden: &[&str]) -> Value {
    if let Some(props) = schema.get_mut("properties").and_then(Value::as_object_mut) {
        for k in hidden {
            props.remove(*k);
        }
    }
    if let Some(req) = schema.get_mut("required").and_then(Value::as_array_mut) {
        req.retain(|r| !hidden.iter().any(|h| r == h));
    }
    schema
}

fn list_of(item: &str) -> Value {
    json!({"type": "object", "properties": {"list": {"type": "array", "items": {"$ref": format!("#/components/schemas/{item}")}}, "total": {"type": "integer"}}, "required": ["list", "total"]})
}

fn body(name: &str) -> Value {
    json!({"required": true, "content": {"application/json": {"schema": {"$ref": format!("#/components/schemas/{name}")}}}})
}

fn answer(what: &str, name: &str) -> Value {
    json!({"description": what, "content": {"application/json": {"schema": {"$ref": format!("#/components/schemas/{name}")}}}})
}

/// The failures every operation may answer with, beside `ok`.
fn responses(ok: &[(&str, &str, &str)]) -> Value {
    let mut r = Map::new();
    for (status, what, name) in ok {
        r.insert(status.to_string(), answer(what, name));
    }
    for (status, what) in [("400", "bad input, every problem listed"), ("401", "no valid admin key or token"), ("403", "the role may not do this"), ("404", "not found, or not the caller's")] {
        r.entry(status.to_string()).or_insert_with(|| answer(what, "Error"));
    }
    Value::Object(r)
}

fn param(name: &str, what: &str) -> Value {
    json!({"name": name, "in": "path", "required": true, "description": what, "schema": {"type": "string"}})
}

fn query(name: &str, what: &str) -> Value {
    json!({"name": name, "in": "query", "required": false, "description": what, "schema": {"type": "string"}})
}

pub fn document() -> Value {
    let gid = param("gid", "the gateway id");
    let env = param("env", "dev, staging or prod");
    let func = param("fn", "the function's full name, `{env}/{name}`, percent-encoded as one segment (`dev%2Fuser%2Fme`)");
    let mut token = schema::<Token>();
    token = without(token, &["expires"]);
    let mut minted = token.clone();
    minted["properties"]["token"] = json!({"type": "string", "description": "the token: shown here only"});
    json!({
        "openapi": "3.1.0",
        "info": {"title": "Weir platform API", "version": "1"},
        "security": [{"adminKey": []}, {"bearer": []}],
        "paths": {
            "/v1/api-gateways": {
                "post": {"summary": "Create a gateway", "requestBody": body("CreateGateway"), "responses": responses(&[("201", "created; environments follow", "Gateway"), ("409", "the id is taken", "Error")])},
                "get": {"summary": "The gateways the caller sees", "responses": responses(&[("200", "gateways", "GatewayList")])}
            },
            "/v1/api-gateways/{gid}": {
                "parameters": [gid],
                "get": {"summary": "One gateway, with its environments and their phases", "responses": responses(&[("200", "the gateway", "Gateway")])},
                "patch": {"summary": "Change a gateway", "requestBody": body("PatchGateway"), "responses": responses(&[("200", "the gateway as changed", "Gateway"), ("409", "the gateway is being deleted", "Error")])},
                "delete": {"summary": "Delete a gateway and everything it owns", "responses": responses(&[("202", "deleting", "Gateway")])}
            },
            "/v1/api-gateways/{gid}/environments": {
                "parameters": [gid],
                "get": {"summary": "A gateway's environments", "responses": responses(&[("200", "environments", "EnvironmentList")])}
            },
            "/v1/api-gateways/{gid}/environments/{env}": {
                "parameters": [gid, env],
                "get": {"summary": "One environment", "responses": responses(&[("200", "the environment", "Environment")])},
                "patch": {"summary": "Change an environment", "requestBody": body("PatchEnvironment"), "responses": responses(&[("200", "the environment as changed", "Environment")])}
            },
            "/v1/api-gateways/{gid}/environments/{env}/effective-plugins": {
                "parameters": [gid, env],
                "get": {"summary": "The merged plugins and the layer each came from", "responses": responses(&[("200", "plugins", "EffectivePlugins")])}
            },
            "/v1/api-gateways/{gid}/functions": {
                "parameters": [gid],
                "post": {"summary": "Save a function in dev; live at once", "requestBody": body("CreateFunction"), "responses": responses(&[("201", "the function", "Function"), ("409", "the name is taken", "Error"), ("429", "past the gateway's function quota", "Error")])},
                "get": {"summary": "A gateway's functions (`?environment=`)", "responses": responses(&[("200", "functions", "FunctionList")])}
            },
            "/v1/api-gateways/{gid}/functions/{fn}": {
                "parameters": [gid, func],
                "get": {"summary": "One function, with its source", "responses": responses(&[("200", "the function", "Function")])},
                "patch": {"summary": "Change a function; a new source is its next version", "requestBody": body("PatchFunction"), "responses": responses(&[("200", "the function as changed", "Function"), ("429", "past the gateway's function quota", "Error")])},
                "delete": {"summary": "Delete a function", "responses": responses(&[("200", "deleted", "Deleted"), ("409", "changed meanwhile", "Error")])}
            },
            "/v1/api-gateways/{gid}/functions/{fn}/invoke": {
                "parameters": [gid, func],
                "post": {"summary": "Run a function as a request would, without the route's plugins", "requestBody": body("InvokeInput"), "responses": responses(&[("200", "what it answered and logged", "Invocation"), ("503", "it cannot run on this node now", "Error")])}
            },
            "/v1/api-gateways/{gid}/functions/{fn}/logs": {
                "parameters": [gid, func],
                "get": {"summary": "A function's last log lines on this node (`?since=` RFC 3339, `&limit=`)", "responses": responses(&[("200", "log lines, oldest first", "LogList")])}
            },
            "/v1/api-gateways/{gid}/functions/{fn}/history": {
                "parameters": [gid, func],
                "get": {"summary": "The function's last versions in its environment, newest first, without their source", "responses": responses(&[("200", "versions", "HistoryList")])}
            },
            "/v1/api-gateways/{gid}/functions/{fn}/history/{version}": {
                "parameters": [gid, func, param("version", "the version number")],
                "get": {"summary": "One version, with its source", "responses": responses(&[("200", "the version", "HistoryEntry")])}
            },
            "/v1/api-gateways/{gid}/functions/{fn}/deploy-to-stage": {
                "parameters": [gid, func],
                "post": {"summary": "Promote the function to another environment as that environment's next version", "requestBody": body("DeployInput"), "responses": responses(&[("200", "the function as published there, and the deployment record", "Deployed"), ("409", "it kept changing meanwhile", "Error"), ("429", "past the gateway's function quota", "Error")])}
            },
            "/v1/api-gateways/{gid}/functions/{fn}/rollback": {
                "parameters": [gid, func],
                "post": {"summary": "Publish a version of the history as the next version", "requestBody": body("RollbackInput"), "responses": responses(&[("200", "the function as published, and the deployment record", "Deployed"), ("409", "it kept changing meanwhile", "Error"), ("429", "past the gateway's function quota", "Error")])}
            },
            "/v1/api-gateways/{gid}/functions/compare": {
                "parameters": [gid],
                "get": {"summary": "Two functions side by side with a line diff of each file (`?source=dev/x&target=staging/x`)", "responses": responses(&[("200", "both and their diff", "Comparison")])}
            },
            "/v1/api-gateways/{gid}/deployments": {
                "parameters": [gid],
                "get": {"summary": "Promotions and rollbacks, newest first (`?environment=` the target, `&function=` the bare name)", "responses": responses(&[("200", "deployments", "DeploymentList")])}
            },
            "/v1/api-gateways/{gid}/triggers": {
                "parameters": [gid],
                "post": {"summary": "Run a function on a cron schedule (5 or 6 fields, UTC), once per tick across the cluster", "requestBody": body("CreateTrigger"), "responses": responses(&[("201", "the trigger", "Trigger"), ("429", "the gateway has its most triggers", "Error")])},
                "get": {"summary": "A gateway's triggers", "responses": responses(&[("200", "triggers", "TriggerList")])}
            },
            "/v1/api-gateways/{gid}/triggers/{triggerId}": {
                "parameters": [gid, param("triggerId", "the trigger's id")],
                "get": {"summary": "One trigger", "responses": responses(&[("200", "the trigger", "Trigger")])},
                "delete": {"summary": "Delete a trigger and its runs", "responses": responses(&[("200", "deleted", "Deleted")])}
            },
            "/v1/api-gateways/{gid}/triggers/{triggerId}/runs": {
                "parameters": [gid, param("triggerId", "the trigger's id")],
                "get": {"summary": "The trigger's last runs, newest first", "responses": responses(&[("200", "runs", "RunList")])}
            },
            "/v1/api-gateways/{gid}/database/collections": {
                "parameters": [gid, query("environment", "the environment whose database, when each has its own (default: the gateway's one database)")],
                "get": {"summary": "The collections of the gateway's database, with counts, sizes and indexes", "responses": responses(&[("200", "collections", "CollectionList")])}
            },
            "/v1/api-gateways/{gid}/database/collections/{collection}/documents": {
                "parameters": [gid, param("collection", "the collection's name"), query("environment", "as above")],
                "get": {"summary": "Documents matching `?filter=` (JSON), with `sort` (JSON), `limit` (1 to 1,000, default 100) and `skip`", "responses": responses(&[("200", "documents", "DocumentList")])},
                "post": {"summary": "Insert a document (its `_id` is made when it has none)", "requestBody": {"required": true, "content": {"application/json": {"schema": {"type": "object"}}}}, "responses": responses(&[("201", "inserted", "Inserted"), ("409", "the _id is taken", "Error"), ("507", "over the database's quota", "Error")])}
            },
            "/v1/api-gateways/{gid}/database/collections/{collection}/documents/{id}": {
                "parameters": [gid, param("collection", "the collection's name"), param("id", "the document's `_id` (a string)"), query("environment", "as above")],
                "get": {"summary": "One document", "responses": responses(&[("200", "the document", "Document")])},
                "put": {"summary": "Replace (or add) the document of this `_id`", "requestBody": {"required": true, "content": {"application/json": {"schema": {"type": "object"}}}}, "responses": responses(&[("200", "what changed, and the document", "Replaced")])},
                "delete": {"summary": "Delete one document", "responses": responses(&[("200", "deleted", "DeletedCount")])}
            },
            "/v1/api-gateways/{gid}/database/export": {
                "parameters": [gid, query("environment", "as above")],
                "get": {"summary": "The whole database as JSON lines `{\"collection\", \"document\"}`", "responses": {"200": {"description": "JSON lines", "content": {"application/x-ndjson": {"schema": {"type": "string"}}}}}}
            },
            "/v1/api-gateways/{gid}/database/import": {
                "parameters": [gid, query("environment", "as above")],
                "post": {"summary": "Restore JSON lines as `export` writes them; each document replaces the one of its `_id`", "requestBody": {"required": true, "content": {"application/x-ndjson": {"schema": {"type": "string"}}}}, "responses": responses(&[("200", "how many", "Imported")])}
            },
            "/v1/applications": {
                "post": {"summary": "Make an application (a client of tenants' APIs)", "requestBody": body("CreateApplication"), "responses": responses(&[("201", "the application", "Application")])},
                "get": {"summary": "The applications the caller made (all, for an admin key)", "responses": responses(&[("200", "applications", "ApplicationList")])}
            },
            "/v1/applications/{appId}": {
                "parameters": [param("appId", "the application's id")],
                "get": {"summary": "One application, with its grants", "responses": responses(&[("200", "the application", "ApplicationWithGrants")])},
                "patch": {"summary": "Change an application", "requestBody": body("PatchApplication"), "responses": responses(&[("200", "the application as changed", "Application")])},
                "delete": {"summary": "Delete an application, its grants and their keys", "responses": responses(&[("200", "deleted", "Object")])}
            },
            "/v1/applications/{appId}/usage": {
                "parameters": [param("appId", "the application's id"), query("from", "RFC 3339; by default an hour before `to`"), query("to", "RFC 3339; by default now"), query("step", "seconds, a multiple of 60; by default 60")],
                "get": {"summary": "The application's requests, errors and latency on this node, in total and per step", "responses": responses(&[("200", "usage", "Usage")])}
            },
            "/v1/applications/{appId}/grants": {
                "parameters": [param("appId", "the application's id")],
                "post": {"summary": "Grant the application one environment of a gateway; its key or credentials are in this answer only", "requestBody": body("CreateGrant"), "responses": responses(&[("201", "the grant and its apiKey or credentials", "GrantWithKey"), ("409", "the application has a grant for that environment", "Error")])},
                "get": {"summary": "The application's grants (`?gatewayId=&environment=`)", "responses": responses(&[("200", "grants", "GrantList")])}
            },
            "/v1/applications/{appId}/grants/{grantId}": {
                "parameters": [param("appId", "the application's id"), param("grantId", "the grant's id")],
                "get": {"summary": "One grant", "responses": responses(&[("200", "the grant", "Grant")])},
                "delete": {"summary": "Revoke a grant: its key stops at once", "responses": responses(&[("200", "deleted", "Deleted")])}
            },
            "/v1/applications/{appId}/grants/{grantId}/regenerate": {
                "parameters": [param("appId", "the application's id"), param("grantId", "the grant's id")],
                "post": {"summary": "A new key or credentials; the old ones stop at once, or after `overlapSeconds`", "requestBody": body("Regenerate"), "responses": responses(&[("200", "the grant and its new apiKey or credentials", "GrantWithKey")])}
            },
            "/v1/api-gateways/{gid}/grants": {
                "parameters": [gid],
                "get": {"summary": "The grants on a gateway", "responses": responses(&[("200", "grants", "GrantList")])}
            },
            "/v1/api-gateways/{gid}/environments/{env}/grants": {
                "parameters": [gid, env],
                "get": {"summary": "The grants on one environment", "responses": responses(&[("200", "grants", "GrantList")])}
            },
            "/v1/tokens": {
                "post": {"summary": "Make a token", "requestBody": body("CreateToken"), "responses": responses(&[("201", "the token, shown once", "MintedToken")])},
                "get": {"summary": "The tokens the caller manages", "responses": responses(&[("200", "tokens", "TokenList")])}
            },
            "/v1/tokens/{id}": {
                "parameters": [param("id", "the token's id")],
                "delete": {"summary": "Revoke a token", "responses": responses(&[("200", "the revoked token", "Token")])}
            },
            "/v1/whoami": {
                "get": {"summary": "Who the caller is", "responses": responses(&[("200", "the caller", "Caller")])}
            }
        },
        "components": {
            "securitySchemes": {
                "adminKey": {"type": "apiKey", "in": "header", "name": "X-API-KEY"},
                "bearer": {"type": "http", "scheme": "bearer"}
            },
            "schemas": {
                "CreateGateway": schema::<CreateGateway>(),
                "PatchGateway": schema::<PatchGateway>(),
                "PatchEnvironment": schema::<PatchEnvironment>(),
                "CreateToken": schema::<CreateToken>(),
                "Gateway": without(schema::<Gateway>(), &Gateway::HIDDEN),
                "GatewayList": list_of("Gateway"),
                "Environment": schema::<Environment>(),
                "EnvironmentList": list_of("Environment"),
                "EffectivePlugins": {"type": "object", "properties": {
                    "environment": {"type": "string"},
                    "plugins": {"type": "array", "items": {"type": "object", "properties": {
                        "name": {"type": "string"}, "layer": {"enum": ["base", "gateway", "environment"]}, "config": {"type": "object"}
                    }, "required": ["name", "layer", "config"], "additionalProperties": false}}
                }, "required": ["environment", "plugins"], "additionalProperties": false},
                "Token": token,
                "MintedToken": minted,
                "TokenList": list_of("Token"),
                "Caller": {"type": "object"},
                "CreateFunction": schema::<CreateFunction>(),
                "PatchFunction": schema::<PatchFunction>(),
                "InvokeInput": schema::<InvokeInput>(),
                "Function": schema::<Shown>(),
                "FunctionList": list_of("Function"),
                "Invocation": schema::<Invocation>(),
                "LogLine": {"type": "object", "properties": {
                    "time": {"type": "string", "format": "date-time"}, "level": {"type": "string"}, "requestId": {"type": "string"}, "message": {"type": "string"}
                }, "required": ["time", "level", "requestId", "message"], "additionalProperties": false},
                "LogList": list_of("LogLine"),
                "HistoryEntry": schema::<HistoryEntry>(),
                "HistoryList": {"type": "object", "properties": {"list": {"type": "array", "items": without(schema::<HistoryEntry>(), &["source"])}, "total": {"type": "integer"}}, "required": ["list", "total"]},
                "DeployInput": schema::<DeployInput>(),
                "RollbackInput": schema::<RollbackInput>(),
                "Deployed": schema::<Deployed>(),
                "Deployment": schema::<Deployment>(),
                "DeploymentList": list_of("Deployment"),
                "Comparison": {"type": "object", "properties": {
                    "source": {"$ref": "#/components/schemas/Function"}, "target": {"$ref": "#/components/schemas/Function"},
                    "identical": {"type": "boolean"}, "files": {"type": "array", "items": schema::<FileDiff>()}
                }, "required": ["source", "target", "identical", "files"], "additionalProperties": false},
                "CreateTrigger": schema::<CreateTrigger>(),
                "Trigger": schema::<Trigger>(),
                "TriggerList": list_of("Trigger"),
                "Run": schema::<Run>(),
                "RunList": list_of("Run"),
                "CreateApplication": schema::<CreateApplication>(),
                "PatchApplication": schema::<PatchApplication>(),
                "Application": schema::<Application>(),
                "ApplicationList": list_of("Application"),
                "ApplicationWithGrants": {"allOf": [{"$ref": "#/components/schemas/Application"}, {"type": "object", "properties": {"grants": {"type": "array", "items": {"$ref": "#/components/schemas/Grant"}}}, "required": ["grants"]}]},
                "CreateGrant": schema::<CreateGrant>(),
                "Regenerate": schema::<Regenerate>(),
                "Grant": schema::<Grant>(),
                "GrantList": list_of("Grant"),
                "Usage": schema::<crate::usage::Usage>(),
                "GrantWithKey": {"allOf": [{"$ref": "#/components/schemas/Grant"}, {
                    "type": "object",
                    "description": "The grant's secret, shown here only: `apiKey` in a key-auth (or auth-less) environment, `credentials` in a basic-auth or jwt-auth one",
                    "properties": {
                        "apiKey": {"type": "string", "description": "sk- and 64 hex digits"},
                        "credentials": {"oneOf": [
                            {"type": "object", "description": "basic-auth", "properties": {"username": {"type": "string", "description": "the credentialId"}, "password": {"type": "string", "description": "sk- and 64 hex digits"}}, "required": ["username", "password"]},
                            {"type": "object", "description": "jwt-auth: sign HS256 tokens with `secret` and give `key` as their `key` claim", "properties": {"key": {"type": "string", "description": "the credentialId"}, "secret": {"type": "string", "description": "64 hex digits"}}, "required": ["key", "secret"]}
                        ]}
                    },
                    "oneOf": [{"required": ["apiKey"]}, {"required": ["credentials"]}]
                }]},
                "Object": {"type": "object"},
                "CollectionList": list_of("Collection"),
                "Collection": {"type": "object", "properties": {
                    "name": {"type": "string"}, "documents": {"type": "integer"}, "bytes": {"type": "integer"},
                    "indexes": {"type": "array", "items": {"type": "object", "properties": {"name": {"type": "string"}, "keys": {"type": "object"}, "unique": {"type": "boolean"}}, "required": ["name", "keys", "unique"], "additionalProperties": false}}
                }, "required": ["name", "documents", "bytes", "indexes"], "additionalProperties": false},
                "Document": {"type": "object", "required": ["_id"]},
                "DocumentList": list_of("Document"),
                "Inserted": {"type": "object", "properties": {"acknowledged": {"type": "boolean"}, "insertedId": {}}, "required": ["acknowledged", "insertedId"], "additionalProperties": false},
                "Replaced": {"type": "object", "properties": {"result": {"type": "object"}, "document": {"$ref": "#/components/schemas/Document"}}, "required": ["result", "document"], "additionalProperties": false},
                "DeletedCount": {"type": "object", "properties": {"acknowledged": {"type": "boolean"}, "deletedCount": {"type": "integer"}}, "required": ["acknowledged", "deletedCount"], "additionalProperties": false},
                "Imported": {"type": "object", "properties": {"imported": {"type": "integer"}}, "required": ["imported"], "additionalProperties": false},
                "Deleted": {"type": "object", "properties": {"deleted": {"type": "string"}}, "required": ["deleted"], "additionalProperties": false},
                "Error": {"type": "object", "properties": {"error": {"type": "object", "properties": {
                    "kind": {"type": "string"}, "message": {"type": "string"}, "problems": {"type": "array", "items": {"type": "string"}},
                    "file": {"type": "string", "description": "a source that does not compile: the file"},
                    "line": {"type": "integer", "minimum": 1}, "column": {"type": "integer", "minimum": 1}
                }, "required": ["kind", "message", "problems"], "additionalProperties": false}}, "required": ["error"], "additionalProperties": false}
            }
        }
    })
}
