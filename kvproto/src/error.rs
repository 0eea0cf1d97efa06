use serde::{Deserialize, Serialize};

/// The body of every error answer:
/// `{"error": {"code": "<snake_case>", "message": "..."}}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

/// What went wrong: a stable code (see [`crate::code`]) for programs, and a
/// sentence for people.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorDetail {
    pub code: String,
    pub message: String,
}

impl ErrorBody {
    pub fn new(code: &str, message: impl Into<String>) -> ErrorBody {
        ErrorBody {
            error: ErrorDetail {
                code: code.to_string(),
                message: message.into(),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_error_body_has_its_documented_shape() {
        let b = ErrorBody::new(crate::code::KEY_NOT_FOUND, "no such key");
        let json = serde_json::to_string(&b).unwrap();
        assert_eq!(
            json,
            r#"{"error":{"code":"key_not_found","message":"no such key"}}"#
        );
        assert_eq!(serde_json::from_str::<ErrorBody>(&json).unwrap(), b);
    }
}
