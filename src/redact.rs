//! What a URL may show in a message, a log or a metric: never its user info,
//! query or fragment, where passwords, tokens and signatures live
//! (`http://user:pass@pushgateway:9091`, an Azure SAS query).

use url::Url;

/// `location` without user info, query or fragment; something that looks
/// like a URL but does not parse keeps its scheme only.
#[must_use]
pub fn url(location: &str) -> String {
    match Url::parse(location) {
        Ok(u) => parsed_url(&u),
        Err(_) => match location.split_once("://") {
            Some((scheme, _)) => format!("{scheme}://…"),
            None => "…".to_owned(),
        },
    }
}

/// A parsed URL without user info, query or fragment.
#[must_use]
pub fn parsed_url(url: &Url) -> String {
    let mut u = url.clone();
    let _ = u.set_username("");
    let _ = u.set_password(None);
    u.set_query(None);
    u.set_fragment(None);
    u.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn user_info_query_and_fragment_never_show() {
        for (given, shown) in [
            ("http://u:s3cret@gw:9091/x?sig=tok#f", "http://gw:9091/x"),
            ("ftp://u:s3cret@x", "ftp://x/"),
            ("http://:s3cret@gw:9091", "http://gw:9091/"),
            ("https://gw.example/", "https://gw.example/"),
        ] {
            assert_eq!(url(given), shown, "{given}");
        }
        assert_eq!(url("http://u:s3cret@[bad"), "http://…");
        assert_eq!(url("not a url s3cret"), "…");
    }
}
