//! Reading what a response says its request used (`cost response …`) as the response
//! passes: headers at once, trailers when they come, a JSON body at its end (a copy of at
//! most [`MAX_JSON_BODY`] bytes is kept to read it; the client gets every byte as it comes),
//! the events of a `text/event-stream` body one by one (an event of at most [`MAX_EVENT`]
//! bytes; the last event that carries a field gives its amount, so an OpenAI-style final
//! chunk with `usage`, or Anthropic's `message_start` and `message_delta`, are read as they
//! pass).

use http::HeaderMap;

use crate::plan::{Amount, Usage};
use crate::request::amount::header_amount;
use crate::request::{is_json_media, media_type};

/// The largest JSON body read for its usage; past it, the response does not say.
pub const MAX_JSON_BODY: usize = 1 << 20;
/// The largest event of an event stream read for its usage; a larger one is skipped.
pub const MAX_EVENT: usize = 64 << 10;

/// What one response said of the amounts its request's limits read.
#[derive(Debug)]
pub struct Meter {
    /// Each amount read, once, with what the response said of it so far.
    amounts: Vec<(Amount, Option<u64>)>,
    body: Body,
}

#[derive(Debug)]
enum Body {
    /// Nothing to read in the body (no JSON amount, or neither JSON nor events).
    Ignored,
    /// A JSON document, read at its end.
    Json { copy: Vec<u8>, over: bool },
    /// An event stream: the line being read, the current event's data.
    Events {
        line: Vec<u8>,
        data: Vec<u8>,
        over: bool,
    },
}

impl Meter {
    /// A meter for the amounts `usages` read, in a response with `headers`: header amounts
    /// are read now.
    pub fn new<'u>(usages: impl Iterator<Item = &'u Usage>, headers: &HeaderMap) -> Self {
        let mut amounts: Vec<(Amount, Option<u64>)> = Vec::new();
        for usage in usages {
            for (_, amount) in usage.terms.iter() {
                if !amounts.iter().any(|(a, _)| a == amount) {
                    amounts.push((amount.clone(), None));
                }
            }
        }
        let reads_json = amounts.iter().any(|(a, _)| matches!(a, Amount::Json(_)));
        let content_type = media_type(headers);
        let too_long = headers
            .get(http::header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok()?.parse::<u64>().ok())
            .is_some_and(|n| n > MAX_JSON_BODY as u64);
        let body = if !reads_json {
            Body::Ignored
        } else if content_type == "text/event-stream" {
            Body::Events {
                line: Vec::new(),
                data: Vec::new(),
                over: false,
            }
        } else if is_json_media(&content_type) {
            Body::Json {
                copy: Vec::new(),
                over: too_long,
            }
        } else {
            Body::Ignored
        };
        let mut meter = Meter { amounts, body };
        meter.headers(headers);
        meter
    }

    /// Whether the body must be looked at.
    pub fn reads_body(&self) -> bool {
        !matches!(self.body, Body::Ignored)
    }

    /// Header amounts from `headers` (the response's, or its trailers).
    pub fn headers(&mut self, headers: &HeaderMap) {
        for (amount, said) in &mut self.amounts {
            if let Amount::Header(name) = amount
                && let Some(n) = headers.get(&*name).and_then(header_amount)
            {
                *said = Some(n);
            }
        }
    }

    /// The next bytes of the body.
    pub fn feed(&mut self, chunk: &[u8]) {
        match &mut self.body {
            Body::Ignored => {}
            Body::Json { copy, over } => {
                if !*over {
                    if copy.len() + chunk.len() > MAX_JSON_BODY {
                        *over = true;
                        *copy = Vec::new();
                    } else {
                        copy.extend_from_slice(chunk);
                    }
                }
            }
            Body::Events { .. } => {
                let mut rest = chunk;
                while !rest.is_empty() {
                    let Body::Events { line, over, .. } = &mut self.body else {
                        return;
                    };
                    match rest.iter().position(|&b| b == b'\n') {
                        Some(end) => {
                            if !*over && line.len() + end <= MAX_EVENT {
                                line.extend_from_slice(&rest[..end]);
                            } else {
                                *over = true;
                            }
                            rest = &rest[end + 1..];
                            self.event_line();
                        }
                        None => {
                            if !*over && line.len() + rest.len() <= MAX_EVENT {
                                line.extend_from_slice(rest);
                            } else {
                                *over = true;
                            }
                            rest = &[];
                        }
                    }
                }
            }
        }
    }

    /// One whole line of an event stream (without its `\n`).
    fn event_line(&mut self) {
        let Body::Events { line, data, over } = &mut self.body else {
            return;
        };
        if line.last() == Some(&b'\r') {
            line.pop();
        }
        if line.is_empty() {
            // The end of an event: read its data.
            let event = std::mem::take(data);
            let skipped = std::mem::replace(over, false);
            if !skipped && !event.is_empty() {
                self.read_json(&event);
            }
            return;
        }
        if let Some(value) = line.strip_prefix(b"data:") {
            let value = value.strip_prefix(b" ").unwrap_or(value);
            if data.len() + value.len() + 1 > MAX_EVENT {
                *over = true;
            } else {
                if !data.is_empty() {
                    data.push(b'\n');
                }
                data.extend_from_slice(value);
            }
        }
        line.clear();
    }

    /// A meter for a response described after the fact (`POST /v1/report`): its headers,
    /// and its JSON body (or its stream's usage event) as a document.
    pub fn described<'u>(
        usages: impl Iterator<Item = &'u Usage>,
        headers: &HeaderMap,
        document: Option<&serde_json::Value>,
    ) -> Self {
        let mut meter = Meter::new(usages, headers);
        meter.body = Body::Ignored;
        if let Some(document) = document {
            meter.read_document(document);
        }
        meter
    }

    /// The JSON amounts the document in `text` carries (`[DONE]`, or not JSON: none), each
    /// read in one pass that builds nothing.
    fn read_json(&mut self, text: &[u8]) {
        for (amount, said) in &mut self.amounts {
            if let Amount::Json(path) = amount
                && let Some(n) = path.amount_in(text)
            {
                *said = Some(n);
            }
        }
    }

    /// The JSON amounts `document` carries.
    fn read_document(&mut self, document: &serde_json::Value) {
        for (amount, said) in &mut self.amounts {
            if let Amount::Json(path) = amount
                && let Some(n) = path.amount(document)
            {
                *said = Some(n);
            }
        }
    }

    /// The body ended: a JSON body is read now (an event stream was read as it passed; an
    /// unterminated last line and event end with it).
    pub fn finish(&mut self) {
        match &mut self.body {
            Body::Json { copy, over: false } => {
                let copy = std::mem::take(copy);
                self.read_json(&copy);
            }
            Body::Events { line, .. } => {
                if !line.is_empty() {
                    self.event_line();
                }
                self.event_line();
            }
            _ => {}
        }
        self.body = Body::Ignored;
    }

    /// What the response said `usage` used: the weighted sum of its amounts, at most its
    /// `max`; `None` when it said none of them.
    pub fn used(&self, usage: &Usage) -> Option<u64> {
        usage.total(usage.terms.iter().map(|(_, amount)| {
            self.amounts
                .iter()
                .find(|(a, _)| a == amount)
                .and_then(|(_, said)| *said)
        }))
    }
}

#[cfg(test)]
mod tests {
    use http::{HeaderMap, HeaderName, HeaderValue};

    use super::*;
    use crate::request::JsonPath;

    fn usage(terms: &[(u64, Amount)], max: u64) -> Usage {
        Usage {
            terms: terms.to_vec().into(),
            default: None,
            max,
        }
    }

    fn json(path: &str) -> Amount {
        Amount::Json(JsonPath::parse(path).unwrap())
    }

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        pairs
            .iter()
            .map(|(k, v)| (HeaderName::from_static(k), HeaderValue::from_static(v)))
            .collect()
    }

    #[test]
    fn a_header_is_read_at_once_and_a_trailer_when_it_comes() {
        let u = usage(
            &[(1, Amount::Header(HeaderName::from_static("x-usage")))],
            1_000,
        );
        let mut m = Meter::new([&u].into_iter(), &headers(&[("x-usage", "120")]));
        assert!(!m.reads_body());
        assert_eq!(m.used(&u), Some(120));
        m.headers(&headers(&[("x-usage", "130")]));
        assert_eq!(m.used(&u), Some(130));
        let none = Meter::new([&u].into_iter(), &HeaderMap::new());
        assert_eq!(none.used(&u), None, "said nothing");
    }

    #[test]
    fn a_json_body_split_anywhere_is_read_at_its_end_with_weights_and_a_cap() {
        let u = usage(
            &[
                (1, json("usage.prompt_tokens")),
                (4, json("usage.completion_tokens")),
            ],
            500,
        );
        let body = br#"{"id":"x","usage":{"prompt_tokens":10,"completion_tokens":20}}"#;
        let h = headers(&[("content-type", "application/json; charset=utf-8")]);
        let mut m = Meter::new([&u].into_iter(), &h);
        for chunk in body.chunks(7) {
            m.feed(chunk);
        }
        assert_eq!(m.used(&u), None, "not before the end");
        m.finish();
        assert_eq!(m.used(&u), Some(90));
        let mut big = Meter::new([&u].into_iter(), &h);
        big.feed(br#"{"usage":{"prompt_tokens":400,"completion_tokens":400}}"#);
        big.finish();
        assert_eq!(big.used(&u), Some(500), "at most max");
    }

    #[test]
    fn a_json_body_over_the_cap_says_nothing() {
        let u = usage(&[(1, json("usage.total_tokens"))], 1_000);
        let h = headers(&[("content-type", "application/json")]);
        let mut m = Meter::new([&u].into_iter(), &h);
        m.feed(br#"{"usage":{"total_tokens":5},"pad":""#);
        m.feed(&vec![b'a'; MAX_JSON_BODY]);
        m.feed(br#""}"#);
        m.finish();
        assert_eq!(m.used(&u), None);
    }

    #[test]
    fn openai_and_anthropic_streams_are_read_event_by_event() {
        let openai = usage(&[(1, json("usage.total_tokens"))], 1_000_000);
        let h = headers(&[("content-type", "text/event-stream")]);
        let mut m = Meter::new([&openai].into_iter(), &h);
        let stream = "data: {\"choices\":[{\"delta\":{\"content\":\"Hi\"}}],\"usage\":null}\n\n\
                      data: {\"choices\":[],\"usage\":{\"prompt_tokens\":9,\"completion_tokens\":3,\"total_tokens\":12}}\r\n\r\n\
                      data: [DONE]\n\n";
        for chunk in stream.as_bytes().chunks(5) {
            m.feed(chunk);
        }
        m.finish();
        assert_eq!(m.used(&openai), Some(12));

        let anthropic = usage(
            &[
                (1, json("message.usage.input_tokens")),
                (1, json("usage.output_tokens")),
            ],
            1_000_000,
        );
        let mut m = Meter::new([&anthropic].into_iter(), &h);
        let stream = "event: message_start\ndata: {\"type\":\"message_start\",\"message\":{\"usage\":{\"input_tokens\":25,\"output_tokens\":1}}}\n\n\
                      event: content_block_delta\ndata: {\"type\":\"content_block_delta\"}\n\n\
                      event: message_delta\ndata: {\"type\":\"message_delta\",\"usage\":{\"output_tokens\":15}}\n\n\
                      event: message_stop\ndata: {\"type\":\"message_stop\"}";
        m.feed(stream.as_bytes());
        assert_eq!(m.used(&anthropic), Some(40));
        m.finish();
        assert_eq!(m.used(&anthropic), Some(40));
    }

    #[test]
    fn an_event_over_the_cap_is_skipped_and_the_next_is_read() {
        let u = usage(&[(1, json("usage.total_tokens"))], 1_000_000);
        let h = headers(&[("content-type", "text/event-stream")]);
        let mut m = Meter::new([&u].into_iter(), &h);
        m.feed(b"data: {\"usage\":{\"total_tokens\":1},\"pad\":\"");
        m.feed(&vec![b'a'; MAX_EVENT]);
        m.feed(b"\"}\n\ndata: {\"usage\":{\"total_tokens\":7}}\n\n");
        assert_eq!(m.used(&u), Some(7));
    }

    #[test]
    fn other_bodies_are_not_read() {
        let u = usage(&[(1, json("usage.total_tokens"))], 1_000);
        let m = Meter::new([&u].into_iter(), &headers(&[("content-type", "text/html")]));
        assert!(!m.reads_body());
    }
}
