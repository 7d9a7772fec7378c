//! Style presets: named prompt templates with a negative prompt, as SDXL front-ends offer them
//! ("photographic", "cinematic", "anime", ...).
//!
//! The presets ship in `config/styles.toml` and are compiled into the binary
//! ([`StyleCatalog::builtin`]). A job selects one by name (`"style"`); names are matched after
//! lowercasing and turning spaces and hyphens into `_`, so "Digital Art" selects `digital_art`.
//!
//! Applying a style (see [`Style::apply`]):
//! - the prompt becomes the style's `prompt` template with every `{prompt}` replaced by the job's
//!   prompt; `prompt_2`, when given, goes through the same template;
//! - the negative prompt becomes the style's negative prompt, followed by `", "` and the job's
//!   negative prompt when it has a non-empty one (the same for `negative_prompt_2` when given).
//!   A style's negative prompt therefore replaces the all-zero negative conditioning SDXL uses
//!   when a job has no negative prompt.

use std::sync::OnceLock;

use serde::{Deserialize, Serialize};

/// The presets file compiled into the binary.
pub const BUILTIN_STYLES_TOML: &str = include_str!("../config/styles.toml");

/// The placeholder a template must contain.
pub const PLACEHOLDER: &str = "{prompt}";

/// Why a styles file cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum StyleError {
    #[error("the styles file is not valid TOML")]
    Toml(#[source] toml::de::Error),
    #[error("style {name:?}: {message}")]
    Invalid { name: String, message: String },
    #[error("style {0:?} is defined twice")]
    Duplicate(String),
}

impl StyleError {
    /// Stable snake_case code.
    pub fn code(&self) -> &'static str {
        match self {
            StyleError::Toml(_) => "styles_toml",
            StyleError::Invalid { .. } => "style_invalid",
            StyleError::Duplicate(_) => "style_duplicate",
        }
    }
}

/// One preset.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Style {
    pub name: String,
    #[serde(default)]
    pub description: String,
    /// The prompt template; contains [`PLACEHOLDER`].
    pub prompt: String,
    pub negative_prompt: String,
}

/// The texts of a request after a style is applied.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StyledPrompts {
    pub prompt: String,
    pub prompt_2: Option<String>,
    pub negative_prompt: Option<String>,
    pub negative_prompt_2: Option<String>,
}

impl Style {
    /// The style's template with `prompt` in place of every `{prompt}`.
    pub fn apply_prompt(&self, prompt: &str) -> String {
        self.prompt.replace(PLACEHOLDER, prompt)
    }

    /// The style's negative prompt, followed by the job's own when it has a non-empty one.
    /// `None` only when both are empty/absent.
    pub fn apply_negative(&self, negative: Option<&str>) -> Option<String> {
        let own = negative.filter(|n| !n.trim().is_empty());
        match (self.negative_prompt.trim().is_empty(), own) {
            (true, None) => negative.map(str::to_owned),
            (true, Some(n)) => Some(n.to_owned()),
            (false, None) => Some(self.negative_prompt.clone()),
            (false, Some(n)) => Some(format!("{}, {n}", self.negative_prompt)),
        }
    }

    /// Apply the style to a request's four texts.
    pub fn apply(
        &self,
        prompt: &str,
        prompt_2: Option<&str>,
        negative_prompt: Option<&str>,
        negative_prompt_2: Option<&str>,
    ) -> StyledPrompts {
        StyledPrompts {
            prompt: self.apply_prompt(prompt),
            prompt_2: prompt_2.map(|p| self.apply_prompt(p)),
            negative_prompt: self.apply_negative(negative_prompt),
            negative_prompt_2: negative_prompt_2.and_then(|n| self.apply_negative(Some(n))),
        }
    }
}

/// What the capabilities listing shows of a style.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StyleInfo {
    pub name: String,
    pub description: String,
    pub prompt: String,
    pub negative_prompt: String,
}

/// A set of presets, in file order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StyleCatalog {
    styles: Vec<Style>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct StylesFile {
    #[serde(default)]
    style: Vec<Style>,
}

/// The form names are compared in: lowercase, with spaces and hyphens as `_`.
pub fn normalize_name(name: &str) -> String {
    name.trim()
        .chars()
        .map(|c| match c {
            ' ' | '-' => '_',
            c => c.to_ascii_lowercase(),
        })
        .collect()
}

impl StyleCatalog {
    /// Parse and check a styles file (`[[style]]` tables).
    pub fn parse(text: &str) -> Result<Self, StyleError> {
        let file: StylesFile = toml::from_str(text).map_err(StyleError::Toml)?;
        let mut styles: Vec<Style> = Vec::with_capacity(file.style.len());
        for style in file.style {
            let invalid = |message: &str| StyleError::Invalid {
                name: style.name.clone(),
                message: message.to_owned(),
            };
            let name_ok = !style.name.is_empty()
                && style
                    .name
                    .chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
            if !name_ok {
                return Err(invalid(
                    "names use lowercase ASCII letters, digits and `_` only",
                ));
            }
            if !style.prompt.contains(PLACEHOLDER) {
                return Err(invalid("the prompt template must contain {prompt}"));
            }
            if styles.iter().any(|s| s.name == style.name) {
                return Err(StyleError::Duplicate(style.name));
            }
            styles.push(style);
        }
        Ok(Self { styles })
    }

    /// The presets compiled into the binary (`config/styles.toml`).
    pub fn builtin() -> &'static StyleCatalog {
        static BUILTIN: OnceLock<StyleCatalog> = OnceLock::new();
        BUILTIN.get_or_init(|| {
            // The file is part of the source tree and checked by a unit test.
            StyleCatalog::parse(BUILTIN_STYLES_TOML).unwrap_or(StyleCatalog { styles: Vec::new() })
        })
    }

    /// The style called `name` (see [`normalize_name`]).
    pub fn get(&self, name: &str) -> Option<&Style> {
        let wanted = normalize_name(name);
        self.styles.iter().find(|s| s.name == wanted)
    }

    /// Names, in file order.
    pub fn names(&self) -> Vec<&str> {
        self.styles.iter().map(|s| s.name.as_str()).collect()
    }

    /// Every style as the capabilities listing shows it.
    pub fn list(&self) -> Vec<StyleInfo> {
        self.styles
            .iter()
            .map(|s| StyleInfo {
                name: s.name.clone(),
                description: s.description.clone(),
                prompt: s.prompt.clone(),
                negative_prompt: s.negative_prompt.clone(),
            })
            .collect()
    }

    pub fn len(&self) -> usize {
        self.styles.len()
    }

    pub fn is_empty(&self) -> bool {
        self.styles.is_empty()
    }
}

/// The built-in styles, for the capabilities listing.
pub fn list_styles() -> Vec<StyleInfo> {
    StyleCatalog::builtin().list()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_builtin_file_parses_and_offers_the_usual_styles() {
        let catalog = StyleCatalog::parse(BUILTIN_STYLES_TOML).expect("config/styles.toml");
        assert!(catalog.len() >= 12, "{} styles", catalog.len());
        for name in [
            "photographic",
            "cinematic",
            "anime",
            "digital_art",
            "watercolor",
            "line_art",
        ] {
            let style = catalog.get(name).unwrap_or_else(|| panic!("{name}"));
            assert!(!style.negative_prompt.is_empty());
            assert!(!style.description.is_empty());
        }
        assert_eq!(StyleCatalog::builtin(), &catalog);
    }

    #[test]
    fn names_match_loosely() {
        let catalog = StyleCatalog::builtin();
        assert_eq!(catalog.get("Digital Art").unwrap().name, "digital_art");
        assert_eq!(catalog.get(" line-art ").unwrap().name, "line_art");
        assert!(catalog.get("cubism").is_none());
    }

    #[test]
    fn applying_a_style_templates_prompts_and_joins_negatives() {
        let style = Style {
            name: "x".into(),
            description: String::new(),
            prompt: "ink drawing of {prompt}, detailed".into(),
            negative_prompt: "colour".into(),
        };
        let out = style.apply("a cat", Some("fur"), Some("blurry"), None);
        assert_eq!(out.prompt, "ink drawing of a cat, detailed");
        assert_eq!(
            out.prompt_2.as_deref(),
            Some("ink drawing of fur, detailed")
        );
        assert_eq!(out.negative_prompt.as_deref(), Some("colour, blurry"));
        assert_eq!(out.negative_prompt_2, None);
        let out = style.apply("a cat", None, None, Some(""));
        assert_eq!(out.negative_prompt.as_deref(), Some("colour"));
        assert_eq!(out.negative_prompt_2.as_deref(), Some("colour"));
        let plain = Style {
            negative_prompt: String::new(),
            ..style
        };
        assert_eq!(plain.apply_negative(None), None);
        assert_eq!(plain.apply_negative(Some("")), Some(String::new()));
    }

    #[test]
    fn bad_files_are_rejected_with_codes() {
        let missing =
            "[[style]]\nname = \"a\"\nprompt = \"no placeholder\"\nnegative_prompt = \"\"";
        assert_eq!(
            StyleCatalog::parse(missing).unwrap_err().code(),
            "style_invalid"
        );
        let upper = "[[style]]\nname = \"A\"\nprompt = \"{prompt}\"\nnegative_prompt = \"\"";
        assert_eq!(
            StyleCatalog::parse(upper).unwrap_err().code(),
            "style_invalid"
        );
        let twice = "[[style]]\nname = \"a\"\nprompt = \"{prompt}\"\nnegative_prompt = \"\"\n\
                     [[style]]\nname = \"a\"\nprompt = \"{prompt}\"\nnegative_prompt = \"\"";
        assert_eq!(
            StyleCatalog::parse(twice).unwrap_err().code(),
            "style_duplicate"
        );
        assert_eq!(
            StyleCatalog::parse("style = 3").unwrap_err().code(),
            "styles_toml"
        );
    }
}
