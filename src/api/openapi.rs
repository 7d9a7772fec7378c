//! `GET /openapi.json`: the OpenAPI 3.1 document of this API, generated from the handlers'
//! annotations and response types (utoipa), with the job message schema of
//! [`crate::job::schema`] (for this deployment's limits and models) as `JobMessage`, the
//! request body of `POST /v1/jobs`, `/v1/validate` and `/v1/estimate`.

use std::sync::Arc;

use axum::extract::State;
use axum::Json;
use serde_json::{json, Value};
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi};

use super::{capabilities, error, estimate, events, health, jobs, metrics, status, ApiState};

#[derive(OpenApi)]
#[openapi(
    info(
        title = "sdxl-worker",
        description = "Submit SDXL image-generation jobs, follow and cancel them, check requests, \
                       estimate run time and read what the deployment offers. With `api.tokens` \
                       set, /v1 routes need `Authorization: Bearer <token>`."
    ),
    paths(
        jobs::submit,
        jobs::get_job,
        jobs::cancel_job,
        jobs::get_image,
        jobs::validate,
        events::job_events,
        estimate::estimate,
        capabilities::capabilities,
        capabilities::list_schedulers,
        capabilities::list_controlnet_types,
        status::status,
        status::page,
        health::healthz,
        health::readyz,
        metrics::metrics,
        openapi_json,
    ),
    components(schemas(error::ErrorBody, error::ErrorDetail, error::FieldErrorDoc)),
    modifiers(&BearerScheme),
    tags(
        (name = "jobs", description = "Submit, read, follow and cancel jobs"),
        (name = "estimates", description = "Run time, memory and queue wait"),
        (name = "capabilities", description = "Models, schedulers, ControlNet types, limits, GPUs"),
        (name = "status", description = "The live status page"),
        (name = "health", description = "Health, readiness and metrics"),
    )
)]
pub struct ApiDoc;

struct BearerScheme;

impl Modify for BearerScheme {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
        );
    }
}

/// Routes whose request body is a job message.
const JOB_BODY_ROUTES: [&str; 3] = ["/v1/jobs", "/v1/validate", "/v1/estimate"];

/// The document for this deployment.
pub fn document(state: &ApiState) -> Value {
    let mut doc = serde_json::to_value(ApiDoc::openapi()).unwrap_or(Value::Null);
    doc["info"]["version"] = json!(env!("CARGO_PKG_VERSION"));
    let mut schema =
        crate::job::schema::json_schema(&state.config.limits, Some(&state.models.current()));
    if let Some(object) = schema.as_object_mut() {
        object.remove("$id");
        object.remove("$schema");
    }
    doc["components"]["schemas"]["JobMessage"] = schema;
    for path in JOB_BODY_ROUTES {
        let slot =
            &mut doc["paths"][path]["post"]["requestBody"]["content"]["application/json"]["schema"];
        *slot = json!({ "$ref": "#/components/schemas/JobMessage" });
    }
    doc
}

/// This document.
#[utoipa::path(get, path = "/openapi.json", tag = "health",
    responses((status = 200, description = "The OpenAPI 3.1 document", body = Object)))]
pub async fn openapi_json(State(state): State<Arc<ApiState>>) -> Json<Value> {
    Json(document(&state))
}
