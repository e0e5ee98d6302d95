// An independent verifier of delegation-operator access tokens, written with go-jose
// (github.com/go-jose/go-jose/v4) and Go's standard library only.
//
// Usage: go-verifier --issuer URL --ca FILE --audience AUD < tokens.json
//
// It fetches the issuer's OIDC discovery document over HTTPS (trusting only the CA in FILE), then the
// JWKS named by its jwks_uri, and checks each token of the JSON array on stdin
// ([{"name": ..., "token": ...}]) the way a resource server should: algorithm allow-list (ES256 only),
// a kid from the JWKS, typ "at+jwt" (RFC 9068), the signature, iss, aud and exp (required), nbf.
// It prints a JSON array with one verdict per token: {"name", "accepted", "reason", "sub", "jti",
// "actors"}. Tokens are never printed.
package main

import (
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"net/http"
	"os"
	"runtime/debug"
	"strings"
	"time"

	jose "github.com/go-jose/go-jose/v4"
	"github.com/go-jose/go-jose/v4/jwt"
)

type input struct {
	Name  string `json:"name"`
	Token string `json:"token"`
}

type verdict struct {
	Name     string   `json:"name"`
	Accepted bool     `json:"accepted"`
	Reason   string   `json:"reason"`
	Sub      string   `json:"sub,omitempty"`
	Jti      string   `json:"jti,omitempty"`
	Actors   []string `json:"actors,omitempty"`
	Verifier string   `json:"verifier"`
}

// The nested RFC 8693 `act` claim: the current actor first, then who it acts for.
type actor struct {
	Sub string `json:"sub"`
	Act *actor `json:"act,omitempty"`
}

func main() {
	issuer := flag.String("issuer", "", "the expected iss; discovery is fetched from it")
	caFile := flag.String("ca", "", "PEM file of the only CA trusted for HTTPS")
	audience := flag.String("audience", "", "the expected aud")
	flag.Parse()
	if *issuer == "" || *caFile == "" || *audience == "" {
		fail(errors.New("--issuer, --ca and --audience are required"))
	}
	client, err := httpsClient(*caFile)
	if err != nil {
		fail(err)
	}
	jwks, err := fetchJWKS(client, *issuer)
	if err != nil {
		fail(err)
	}
	var inputs []input
	if err := json.NewDecoder(os.Stdin).Decode(&inputs); err != nil {
		fail(fmt.Errorf("reading tokens from stdin: %w", err))
	}
	verdicts := make([]verdict, 0, len(inputs))
	for _, in := range inputs {
		verdicts = append(verdicts, verify(in, jwks, *issuer, *audience))
	}
	out := json.NewEncoder(os.Stdout)
	out.SetIndent("", "  ")
	if err := out.Encode(verdicts); err != nil {
		fail(err)
	}
}

func fail(err error) {
	fmt.Fprintf(os.Stderr, "go-verifier: %v\n", err)
	os.Exit(2)
}

func httpsClient(caFile string) (*http.Client, error) {
	pem, err := os.ReadFile(caFile)
	if err != nil {
		return nil, err
	}
	roots := x509.NewCertPool()
	if !roots.AppendCertsFromPEM(pem) {
		return nil, fmt.Errorf("no certificate in %s", caFile)
	}
	transport := &http.Transport{TLSClientConfig: &tls.Config{RootCAs: roots, MinVersion: tls.VersionTLS12}}
	return &http.Client{Transport: transport, Timeout: 20 * time.Second}, nil
}

func getJSON(client *http.Client, url string, out any) error {
	if !strings.HasPrefix(url, "https://") {
		return fmt.Errorf("refusing a non-https URL: %s", url)
	}
	resp, err := client.Get(url)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(io.LimitReader(resp.Body, 1<<20))
	if err != nil {
		return err
	}
	if resp.StatusCode != http.StatusOK {
		return fmt.Errorf("GET %s: %s", url, resp.Status)
	}
	return json.Unmarshal(body, out)
}

// fetchJWKS follows OIDC discovery: the document's issuer must be ours exactly, its jwks_uri https.
func fetchJWKS(client *http.Client, issuer string) (*jose.JSONWebKeySet, error) {
	var discovery struct {
		Issuer  string `json:"issuer"`
		JWKSURI string `json:"jwks_uri"`
	}
	url := strings.TrimSuffix(issuer, "/") + "/.well-known/openid-configuration"
	if err := getJSON(client, url, &discovery); err != nil {
		return nil, fmt.Errorf("discovery: %w", err)
	}
	if discovery.Issuer != issuer {
		return nil, fmt.Errorf("discovery names issuer %q, expected %q", discovery.Issuer, issuer)
	}
	var jwks jose.JSONWebKeySet
	if err := getJSON(client, discovery.JWKSURI, &jwks); err != nil {
		return nil, fmt.Errorf("jwks: %w", err)
	}
	if len(jwks.Keys) == 0 {
		return nil, errors.New("the JWKS has no keys")
	}
	return &jwks, nil
}

func verify(in input, jwks *jose.JSONWebKeySet, issuer, audience string) verdict {
	v := verdict{Name: in.Name, Verifier: "go-jose " + goJoseVersion()}
	reject := func(err error) verdict {
		v.Reason = err.Error()
		return v
	}
	// The allow-list: a token whose header names any other algorithm (none, HS256, EdDSA) fails here.
	tok, err := jwt.ParseSigned(in.Token, []jose.SignatureAlgorithm{jose.ES256})
	if err != nil {
		return reject(err)
	}
	if len(tok.Headers) != 1 {
		return reject(errors.New("expected exactly one signature"))
	}
	header := tok.Headers[0]
	if typ, _ := header.ExtraHeaders[jose.HeaderType].(string); typ != "at+jwt" {
		return reject(fmt.Errorf("typ is %q, not at+jwt", typ))
	}
	if header.KeyID == "" || len(jwks.Key(header.KeyID)) == 0 {
		return reject(fmt.Errorf("kid %q is not in the JWKS", header.KeyID))
	}
	var claims jwt.Claims
	var extra struct {
		Act *actor `json:"act"`
	}
	if err := tok.Claims(jwks, &claims, &extra); err != nil {
		return reject(err)
	}
	if claims.Expiry == nil {
		return reject(errors.New("exp is missing"))
	}
	expected := jwt.Expected{Issuer: issuer, AnyAudience: jwt.Audience{audience}, Time: time.Now()}
	if err := claims.ValidateWithLeeway(expected, 0); err != nil {
		return reject(err)
	}
	v.Accepted = true
	v.Reason = "valid"
	v.Sub = claims.Subject
	v.Jti = claims.ID
	for a := extra.Act; a != nil; a = a.Act {
		v.Actors = append(v.Actors, a.Sub)
	}
	return v
}

// goJoseVersion is the go-jose module version this binary was built with.
func goJoseVersion() string {
	if info, ok := debug.ReadBuildInfo(); ok {
		for _, dep := range info.Deps {
			if dep.Path == "github.com/go-jose/go-jose/v4" {
				return dep.Version
			}
		}
	}
	return "unknown"
}
