//! ipywidgets' state, saved in the notebook as nbclient and papermill save
//! it (`metadata.widgets`, `application/vnd.jupyter.widget-state+json`
//! version 2.0), so a frontend opening the output shows the widgets as the
//! run left them: each comm's state from its `comm_open`, updated by each
//! `comm_msg` that carries one; only models that name themselves
//! (`_model_name`) are saved. Binary buffers (a message's extra frames) are
//! not: noyau-client does not hand them over.

use noyau_notebook::Notebook;
use serde_json::{json, Map, Value};

const MIME: &str = "application/vnd.jupyter.widget-state+json";

/// Every comm's state so far, in the order they opened.
#[derive(Debug, Default)]
pub(crate) struct Widgets {
    state: Map<String, Value>,
    /// A state changed since the notebook's metadata was last written.
    changed: bool,
}

impl Widgets {
    /// A `comm_open` or `comm_msg`'s content.
    pub fn take(&mut self, content: &Value) {
        let (Some(id), Some(Value::Object(new))) = (
            content.get("comm_id").and_then(Value::as_str),
            content.get("data").and_then(|d| d.get("state")),
        ) else {
            return;
        };
        let entry = self
            .state
            .entry(id.to_string())
            .or_insert_with(|| Value::Object(Map::new()));
        if let Value::Object(state) = entry {
            state.extend(new.iter().map(|(k, v)| (k.clone(), v.clone())));
        }
        self.changed = true;
    }

    /// Writes the state into `nb`'s metadata if it changed.
    pub fn save(&mut self, nb: &mut Notebook) {
        if !std::mem::take(&mut self.changed) {
            return;
        }
        let models: Map<String, Value> = self
            .state
            .iter()
            .filter(|(_, s)| s.get("_model_name").is_some())
            .map(|(id, s)| {
                let model = json!({
                    "model_name": s.get("_model_name"),
                    "model_module": s.get("_model_module"),
                    "model_module_version": s.get("_model_module_version"),
                    "state": s,
                });
                (id.clone(), model)
            })
            .collect();
        nb.metadata.insert(
            "widgets".into(),
            json!({ MIME: { "state": models, "version_major": 2, "version_minor": 0 } }),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_state_of_each_model_as_it_last_was() {
        let mut w = Widgets::default();
        let mut nb = Notebook::new();
        w.save(&mut nb);
        assert!(
            !nb.metadata.contains_key("widgets"),
            "no widget, no metadata"
        );
        w.take(
            &json!({"comm_id": "a", "target_name": "jupyter.widget", "data": {"state": {
            "_model_name": "IntSliderModel", "_model_module": "@jupyter-widgets/controls",
            "_model_module_version": "2.0.0", "value": 3}}}),
        );
        w.take(&json!({"comm_id": "a", "data": {"method": "update", "state": {"value": 7}}}));
        // A custom message carries no state; a comm without a model name is not saved.
        w.take(&json!({"comm_id": "a", "data": {"method": "custom", "content": {}}}));
        w.take(&json!({"comm_id": "b", "data": {"state": {"x": 1}}}));
        w.save(&mut nb);
        let saved = &nb.metadata["widgets"][MIME];
        assert_eq!(saved["version_major"], 2);
        let models = saved["state"].as_object().unwrap();
        assert_eq!(models.keys().collect::<Vec<_>>(), ["a"]);
        assert_eq!(models["a"]["model_name"], "IntSliderModel");
        assert_eq!(models["a"]["model_module_version"], "2.0.0");
        assert_eq!(models["a"]["state"]["value"], 7);
    }
}
